package nbd

import (
	"bufio"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"testing"

	"stor.dev/stor/target"
)

// Benchmarks of the server over loopback TCP with a raw pipelined client
// and a Memory device: 4 KiB random reads and writes at queue depth 1 and
// 32, simple and structured replies.
//
//	go test -run='^$' -bench=. -benchtime=3s ./target/nbd
//
// Allocations reported include the Memory device's own (one 4 KiB block
// copy per written block); the server adds none per request.

func BenchmarkIO(b *testing.B) {
	for _, op := range []string{"read", "write"} {
		for _, qd := range []int{1, 32} {
			for _, structured := range []bool{false, true} {
				name := fmt.Sprintf("%s4k/qd%d/structured=%v", op, qd, structured)
				b.Run(name, func(b *testing.B) { benchIO(b, op == "write", qd, structured) })
			}
		}
	}
}

func benchIO(b *testing.B, write bool, qd int, structured bool) {
	const size, bs = 64 << 20, 4096
	cat, mem := memCatalog("v", target.Geometry{Size: size, BlockSize: 512})
	fill := make([]byte, 1<<20)
	for i := range fill {
		fill[i] = byte(i)
	}
	for off := int64(0); off < size; off += int64(len(fill)) {
		mem.WriteAt(context.Background(), fill, off, false)
	}
	ts := startServer(b, cat, Config{})
	c := connect(b, ts.addr, "v", structured)
	nc := c.nc.(*net.TCPConn)
	br := bufio.NewReaderSize(nc, 256<<10)

	tokens := make(chan struct{}, qd)
	sendErr := make(chan error, 1)
	b.SetBytes(bs)
	b.ReportAllocs()
	b.ResetTimer()
	go func() {
		rng := rand.New(rand.NewPCG(1, 2))
		buf := make([]byte, requestSize+bs)
		for i := 0; i < b.N; i++ {
			tokens <- struct{}{}
			r := request{Type: cmdRead, Cookie: uint64(i), Offset: uint64(rng.IntN(size/bs)) * bs, Length: bs}
			msg := buf[:requestSize]
			if write {
				r.Type = cmdWrite
				msg = buf
			}
			appendRequest(buf[:0], r)
			if _, err := nc.Write(msg); err != nil {
				sendErr <- err
				return
			}
		}
		sendErr <- nil
	}()
	hdr := make([]byte, structuredReplySize+8)
	data := make([]byte, bs)
	for i := 0; i < b.N; i++ {
		switch {
		case write || !structured:
			if _, err := io.ReadFull(br, hdr[:simpleReplySize]); err != nil {
				b.Fatal(err)
			}
			if e := binary.BigEndian.Uint32(hdr[4:8]); e != 0 {
				b.Fatalf("errno %d", e)
			}
		default:
			if _, err := io.ReadFull(br, hdr); err != nil {
				b.Fatal(err)
			}
			if t := binary.BigEndian.Uint16(hdr[6:8]); t != replyOffsetData {
				b.Fatalf("chunk type %d", t)
			}
		}
		if !write {
			if _, err := io.ReadFull(br, data); err != nil {
				b.Fatal(err)
			}
		}
		<-tokens
	}
	b.StopTimer()
	if err := <-sendErr; err != nil {
		b.Fatal(err)
	}
}
