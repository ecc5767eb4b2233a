package nbd

import (
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"stor.dev/stor/target"
)

// Fuzz targets. Quick runs:
//
//	go test -run='^$' -fuzz=FuzzRequest -fuzztime=10s ./target/nbd
//	go test -run='^$' -fuzz=FuzzHandshake -fuzztime=10s ./target/nbd
//
// Seed corpora live in testdata/fuzz; NBD_WRITE_SEEDS=1 go test -run
// TestWriteFuzzSeeds ./target/nbd regenerates them.

// FuzzHandshake feeds arbitrary client bytes to a connection over
// net.Pipe: negotiation and, if the bytes get that far, transmission. The
// server must neither panic nor hang.
func FuzzHandshake(f *testing.F) {
	for _, s := range handshakeSeeds() {
		f.Add(s.data)
	}
	cat, _ := memCatalog("vol1", target.Geometry{Size: 1 << 20, BlockSize: 512})
	srv := NewServer(Config{Catalog: cat, HandshakeTimeout: 5 * time.Second, MaxInFlight: 4})
	defer srv.Close()
	f.Fuzz(func(t *testing.T, data []byte) {
		cli, sc := net.Pipe()
		done := make(chan struct{})
		go func() {
			defer close(done)
			srv.ServeConn(sc)
		}()
		go io.Copy(io.Discard, cli) // ends when cli is closed
		cli.SetWriteDeadline(time.Now().Add(5 * time.Second))
		cli.Write(data) // may fail once the server hangs up
		cli.Close()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatalf("server hangs on input %q", data)
		}
	})
}

// FuzzRequest checks the request header codec: any 28 bytes either parse
// and re-encode to themselves or are refused for their magic; and judging
// the parsed request against a geometry never panics.
func FuzzRequest(f *testing.F) {
	for _, s := range requestSeeds() {
		f.Add(s.data)
	}
	geos := []target.Geometry{
		{Size: 1 << 20, BlockSize: 512},
		{Size: 1 << 30, BlockSize: 4096, ReadOnly: true},
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		if len(b) < requestSize {
			return
		}
		r, err := parseRequest(b)
		if err != nil {
			if binary.BigEndian.Uint32(b) == magicRequest {
				t.Fatalf("good magic refused: %v", err)
			}
			return
		}
		if enc := appendRequest(nil, r); string(enc) != string(b[:requestSize]) {
			t.Fatalf("round trip %x -> %+v -> %x", b[:requestSize], r, enc)
		}
		for _, geo := range geos {
			c := &conn{sess: &session{geo: geo}}
			for _, class := range []cmdClass{classRead, classWrite} {
				e := c.check(&r, cmdFlagFUA|cmdFlagNoHole, class, class == classWrite)
				if e == 0 && (r.Offset > uint64(geo.Size) || uint64(r.Length) > uint64(geo.Size)-r.Offset || r.Offset%uint64(geo.BlockSize) != 0 ||
					r.Length%uint32(geo.BlockSize) != 0 || r.Flags&^(cmdFlagFUA|cmdFlagNoHole) != 0) {
					t.Fatalf("accepted %+v on %+v", r, geo)
				}
			}
		}
	})
}

type seed struct {
	name string
	data []byte
}

func opt(b []byte, o uint32, data []byte) []byte {
	b = binary.BigEndian.AppendUint64(b, magicOpt)
	b = binary.BigEndian.AppendUint32(b, o)
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	return append(b, data...)
}

func req(b []byte, flags, typ uint16, off uint64, n uint32) []byte {
	return appendRequest(b, request{Flags: flags, Type: typ, Cookie: 1, Offset: off, Length: n})
}

func handshakeSeeds() []seed {
	flags := binary.BigEndian.AppendUint32(nil, clientFixedNewstyle|clientNoZeroes)
	cat := func(parts ...[]byte) []byte {
		var b []byte
		for _, p := range parts {
			b = append(b, p...)
		}
		return b
	}
	write := req(nil, cmdFlagFUA, cmdWrite, 512, 512)
	write = append(write, make([]byte, 512)...)
	return []seed{
		{"go_read_disc", cat(flags, opt(nil, optGo, goData("vol1", infoBlockSize)),
			req(nil, 0, cmdRead, 0, 4096), req(nil, 0, cmdDisc, 0, 0))},
		{"structured_meta_blockstatus", cat(flags, opt(nil, optStructuredReply, nil),
			opt(nil, optSetMetaContext, metaData("vol1", metaAllocation)),
			opt(nil, optGo, goData("vol1")),
			req(nil, cmdFlagReqOne, cmdBlockStatus, 0, 1<<20), req(nil, cmdFlagDF, cmdRead, 0, 512),
			req(nil, 0, cmdDisc, 0, 0))},
		{"list_abort", cat(flags, opt(nil, optList, nil), opt(nil, optListMetaContext, metaData("vol1")),
			opt(nil, optAbort, nil))},
		{"info_exportname_write", cat(flags, opt(nil, optInfo, goData("vol1", infoName, infoDescription)),
			opt(nil, optExportName, []byte("vol1")), write,
			req(nil, cmdFlagNoHole|cmdFlagFastZero, cmdWriteZeroes, 0, 4096), req(nil, 0, cmdTrim, 0, 512),
			req(nil, 0, cmdFlush, 0, 0), req(nil, 0, cmdCache, 0, 512))},
		{"extended_headers_unknown_go", cat(flags, opt(nil, optExtendedHeaders, nil), opt(nil, 77, []byte("xyz")),
			opt(nil, optGo, goData("missing")), opt(nil, optGo, goData("vol1")), req(nil, 0, 42, 0, 0))},
		{"bad_option_magic", cat(flags, []byte("IHAVEOPX\x00\x00\x00\x07\x00\x00\x00\x00"))},
	}
}

func requestSeeds() []seed {
	return []seed{
		{"read", req(nil, 0, cmdRead, 4096, 4096)},
		{"write_fua", req(nil, cmdFlagFUA, cmdWrite, 0, 512)},
		{"past_end", req(nil, 0, cmdWrite, 1<<20-512, 1024)},
		{"overflow", req(nil, 0, cmdRead, 1<<64-512, 1024)},
		{"bad_magic", []byte("0123456789abcdef0123456789ab")},
	}
}

// TestWriteFuzzSeeds regenerates testdata/fuzz when NBD_WRITE_SEEDS=1.
func TestWriteFuzzSeeds(t *testing.T) {
	if os.Getenv("NBD_WRITE_SEEDS") != "1" {
		t.Skip("set NBD_WRITE_SEEDS=1 to regenerate testdata/fuzz")
	}
	for target, seeds := range map[string][]seed{"FuzzHandshake": handshakeSeeds(), "FuzzRequest": requestSeeds()} {
		dir := filepath.Join("testdata", "fuzz", target)
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		for _, s := range seeds {
			body := fmt.Sprintf("go test fuzz v1\n[]byte(%q)\n", s.data)
			if err := os.WriteFile(filepath.Join(dir, s.name), []byte(body), 0o644); err != nil {
				t.Fatal(err)
			}
		}
	}
}
