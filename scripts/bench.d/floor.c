// floor.c — the least work a replicated NBD write can cost on this
// machine, for `scripts/bench replicated` (see replicated.sh): a bare NBD
// server that does nothing but what the protocol and the replication need,
// with blocking sockets and no runtime, so that its r2/r1 ratio is what
// process wake-ups, system calls and loopback TCP cost here before any
// design or language choice.
//
//   floor nbd PORT SIZE FILE [NEXT_PORT]
//       An NBD server on 127.0.0.1:PORT, one connection at a time, one
//       export (any name) of SIZE bytes kept in FILE. WRITE: pwrite, then
//       (with NEXT_PORT) send the request to the secondary there and wait
//       for its reply, then reply. The order is the replicated one: the
//       primary notes, the secondary notes, then the acknowledgement.
//       READ: pread. FLUSH: fdatasync (forwarded first with NEXT_PORT).
//       Anything else: EINVAL. Handshake: fixed newstyle; EXPORT_NAME and
//       GO/INFO (NBD_INFO_EXPORT only); every other option is refused with
//       NBD_REP_ERR_UNSUP (doc/proto.md), so clients fall back to simple
//       replies.
//   floor secondary PORT FILE
//       Reads forwarded requests (the 28-byte NBD request header, then a
//       WRITE's data) from one connection at a time, does them on FILE and
//       answers each with a 16-byte simple reply.
//
// No checksums, no journal records, no opnums, no epochs: not a design,
// a floor. Build: cc -O2 -o floor floor.c.
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

enum {
	REQ_MAGIC = 0x25609513,
	REPLY_MAGIC = 0x67446698,
	CMD_READ = 0,
	CMD_WRITE = 1,
	CMD_DISC = 2,
	CMD_FLUSH = 3,
	OPT_EXPORT_NAME = 1,
	OPT_ABORT = 2,
	OPT_INFO = 6,
	OPT_GO = 7,
	REP_ACK = 1,
	REP_INFO = 3,
	MAX_IO = 32 << 20,
};
static const uint32_t REP_ERR_UNSUP = (1u << 31) + 1;
static const uint64_t NBDMAGIC = 0x4e42444d41474943ull, IHAVEOPT = 0x49484156454F5054ull,
		      REPMAGIC = 0x3e889045565a9ull;
static const uint16_t TFLAGS = 1 | 4; // HAS_FLAGS | SEND_FLUSH

static void die(const char *what) {
	perror(what);
	exit(1);
}

// full moves all n bytes of b: reads them (wr == 0) or writes them.
static int full(int fd, void *b, size_t n, int wr) {
	for (size_t done = 0; done < n;) {
		ssize_t k = wr ? write(fd, (char *)b + done, n - done) : read(fd, (char *)b + done, n - done);
		if (k < 0 && errno == EINTR)
			continue;
		if (k <= 0)
			return -1;
		done += k;
	}
	return 0;
}

static int full_read(int fd, void *b, size_t n) { return full(fd, b, n, 0); }
static int full_write(int fd, const void *b, size_t n) { return full(fd, (void *)b, n, 1); }

static void nodelay(int s) {
	int one = 1;
	setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

static int listen_on(int port) {
	int l = socket(AF_INET, SOCK_STREAM, 0), one = 1;
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port), .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	if (l < 0)
		die("socket");
	setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
	if (bind(l, (void *)&a, sizeof a) < 0 || listen(l, 8) < 0)
		die("bind/listen");
	return l;
}

// dial connects to the secondary, retrying for up to 10 s.
static int dial(int port) {
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port), .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	for (int i = 0; i < 200; i++) {
		int s = socket(AF_INET, SOCK_STREAM, 0);
		if (s < 0)
			die("socket");
		if (connect(s, (void *)&a, sizeof a) == 0) {
			nodelay(s);
			return s;
		}
		close(s);
		usleep(50000);
	}
	die("connect to the secondary");
	return -1;
}

struct req {
	uint16_t flags, type;
	uint64_t handle, off;
	uint32_t len;
};

static int read_req(int fd, unsigned char h[28], struct req *r) {
	if (full_read(fd, h, 28))
		return -1;
	uint32_t magic;
	memcpy(&magic, h, 4);
	if (be32toh(magic) != REQ_MAGIC)
		return -1;
	memcpy(&r->flags, h + 4, 2), r->flags = be16toh(r->flags);
	memcpy(&r->type, h + 6, 2), r->type = be16toh(r->type);
	memcpy(&r->handle, h + 8, 8); // echoed as is
	memcpy(&r->off, h + 16, 8), r->off = be64toh(r->off);
	memcpy(&r->len, h + 24, 4), r->len = be32toh(r->len);
	return r->len > MAX_IO ? -1 : 0;
}

static int reply(int fd, uint64_t handle, uint32_t err, const void *data, size_t n) {
	unsigned char h[16];
	uint32_t m = htobe32(REPLY_MAGIC), e = htobe32(err);
	memcpy(h, &m, 4), memcpy(h + 4, &e, 4), memcpy(h + 8, &handle, 8);
	if (n == 0)
		return full_write(fd, h, 16);
	static unsigned char *out;
	if (!out && !(out = malloc(16 + MAX_IO)))
		die("malloc");
	memcpy(out, h, 16), memcpy(out + 16, data, n);
	return full_write(fd, out, 16 + n);
}

// execute does one request on file f; with next >= 0 it forwards writes
// and flushes there after (writes) or before (flushes) its own part.
static uint32_t execute(int f, int next, const unsigned char h[28], const struct req *r, unsigned char *data, uint64_t size) {
	if ((r->type == CMD_READ || r->type == CMD_WRITE) && (r->off > size || r->len > size - r->off))
		return EINVAL;
	switch (r->type) {
	case CMD_WRITE:
		if (pwrite(f, data, r->len, r->off) != (ssize_t)r->len)
			return EIO;
		break;
	case CMD_FLUSH:
		break;
	case CMD_READ:
		return pread(f, data, r->len, r->off) == (ssize_t)r->len ? 0 : EIO;
	default:
		return EINVAL;
	}
	if (next >= 0) {
		unsigned char rep[16];
		uint32_t err;
		if (full_write(next, h, 28) || (r->type == CMD_WRITE && full_write(next, data, r->len)) ||
		    full_read(next, rep, 16))
			die("secondary");
		memcpy(&err, rep + 4, 4);
		if (err)
			return EIO;
	}
	if (r->type == CMD_FLUSH && fdatasync(f) < 0)
		return EIO;
	return 0;
}

// serve runs one client's transmission phase.
static void transmit(int c, int f, int next, uint64_t size, unsigned char *data) {
	unsigned char h[28];
	struct req r;
	while (read_req(c, h, &r) == 0) {
		if (r.type == CMD_DISC)
			return;
		if (r.type == CMD_WRITE && full_read(c, data, r.len))
			return;
		uint32_t err = execute(f, next, h, &r, data, size);
		if (reply(c, r.handle, err, data, r.type == CMD_READ && !err ? r.len : 0))
			return;
	}
}

static int opt_reply(int c, uint32_t opt, uint32_t type, const void *d, uint32_t n) {
	unsigned char h[20];
	uint64_t m = htobe64(REPMAGIC);
	uint32_t o = htobe32(opt), t = htobe32(type), l = htobe32(n);
	memcpy(h, &m, 8), memcpy(h + 8, &o, 4), memcpy(h + 12, &t, 4), memcpy(h + 16, &l, 4);
	return full_write(c, h, 20) || (n && full_write(c, d, n));
}

// handshake runs the fixed-newstyle negotiation; 1: go to transmission.
static int handshake(int c, uint64_t size) {
	unsigned char h[18], opt[16];
	uint64_t m1 = htobe64(NBDMAGIC), m2 = htobe64(IHAVEOPT);
	uint16_t hf = htobe16(1 | 2); // FIXED_NEWSTYLE | NO_ZEROES
	uint32_t cflags;
	memcpy(h, &m1, 8), memcpy(h + 8, &m2, 8), memcpy(h + 16, &hf, 2);
	if (full_write(c, h, 18) || full_read(c, &cflags, 4))
		return 0;
	int nozeroes = be32toh(cflags) & 2;
	for (;;) {
		if (full_read(c, opt, 16))
			return 0;
		uint64_t magic;
		uint32_t o, n;
		memcpy(&magic, opt, 8), memcpy(&o, opt + 8, 4), memcpy(&n, opt + 12, 4);
		o = be32toh(o), n = be32toh(n);
		if (be64toh(magic) != IHAVEOPT || n > 65536)
			return 0;
		unsigned char body[65536];
		if (full_read(c, body, n))
			return 0;
		uint64_t sz = htobe64(size);
		uint16_t tf = htobe16(TFLAGS);
		switch (o) {
		case OPT_EXPORT_NAME: {
			unsigned char out[10 + 124] = {0};
			memcpy(out, &sz, 8), memcpy(out + 8, &tf, 2);
			return !full_write(c, out, nozeroes ? 10 : sizeof out);
		}
		case OPT_INFO:
		case OPT_GO: {
			unsigned char info[12];
			uint16_t it = htobe16(0); // NBD_INFO_EXPORT
			memcpy(info, &it, 2), memcpy(info + 2, &sz, 8), memcpy(info + 10, &tf, 2);
			if (opt_reply(c, o, REP_INFO, info, sizeof info) || opt_reply(c, o, REP_ACK, 0, 0))
				return 0;
			if (o == OPT_GO)
				return 1;
			break;
		}
		case OPT_ABORT:
			opt_reply(c, o, REP_ACK, 0, 0);
			return 0;
		default:
			if (opt_reply(c, o, REP_ERR_UNSUP, 0, 0))
				return 0;
		}
	}
}

static unsigned char *buffer(void) {
	unsigned char *b = malloc(MAX_IO);
	if (!b)
		die("malloc");
	return b;
}

int main(int argc, char **argv) {
	if (argc >= 5 && !strcmp(argv[1], "nbd")) {
		uint64_t size = strtoull(argv[3], 0, 10);
		int f = open(argv[4], O_RDWR | O_CREAT, 0644);
		if (f < 0 || ftruncate(f, size) < 0)
			die(argv[4]);
		int l = listen_on(atoi(argv[2])), next = argc > 5 ? dial(atoi(argv[5])) : -1;
		unsigned char *data = buffer();
		for (;;) {
			int c = accept(l, 0, 0);
			if (c < 0)
				continue;
			nodelay(c);
			if (handshake(c, size))
				transmit(c, f, next, size, data);
			close(c);
		}
	}
	if (argc == 4 && !strcmp(argv[1], "secondary")) {
		int f = open(argv[3], O_RDWR | O_CREAT, 0644), l = listen_on(atoi(argv[2]));
		unsigned char *data = buffer(), h[28];
		struct req r;
		if (f < 0)
			die(argv[3]);
		for (;;) {
			int c = accept(l, 0, 0);
			if (c < 0)
				continue;
			nodelay(c);
			while (read_req(c, h, &r) == 0 && (r.type != CMD_WRITE || !full_read(c, data, r.len))) {
				uint32_t err = 0;
				if (r.type == CMD_WRITE && pwrite(f, data, r.len, r.off) != (ssize_t)r.len)
					err = EIO;
				if (r.type == CMD_FLUSH && fdatasync(f) < 0)
					err = EIO;
				if (reply(c, r.handle, err, 0, 0))
					break;
			}
			close(c);
		}
	}
	fprintf(stderr, "usage: floor nbd PORT SIZE FILE [NEXT_PORT] | floor secondary PORT FILE\n");
	return 2;
}
