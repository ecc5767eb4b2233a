package wire

import (
	"errors"
	"math/rand/v2"
	"reflect"
	"testing"

	"stor.dev/stor/ctl/api"
)

func randMsg(rng *rand.Rand) *Msg {
	m := &Msg{
		Type:      Type(1 + rng.IntN(int(typeEnd)-1)),
		Flags:     uint8(rng.IntN(4)),
		Kind:      Kind(rng.IntN(int(kindEnd))),
		Epoch:     api.Epoch(rng.Uint64()),
		Partition: api.PartitionID(rng.Uint32()),
		ReqID:     rng.Uint64(),
		From:      api.NodeID("n" + string(rune('a'+rng.IntN(26)))),
		To:        "n2",
		PrevEpoch: api.Epoch(rng.IntN(5)),
		PrevOp:    api.OpNum(rng.Uint64()),
		Commit:    api.OpNum(rng.IntN(1000)),
		Sync:      api.OpNum(rng.IntN(1000)),
		Index:     api.OpNum(rng.IntN(1 << 40)),
		Off:       rng.Int64N(1 << 40),
		Len:       rng.Int64N(1 << 20),
	}
	if rng.IntN(2) == 0 {
		m.Data = make([]byte, 1+rng.IntN(100))
		for i := range m.Data {
			m.Data[i] = byte(rng.Uint32())
		}
	}
	for range rng.IntN(4) {
		m.Peers = append(m.Peers, api.NodeID("peer"))
	}
	for i := range rng.IntN(5) {
		e := Entry{Epoch: 3, OpNum: api.OpNum(100 + i), Kind: Kind(1 + rng.IntN(int(kindEnd)-1)), ReqID: rng.Uint64(), Off: 4096, Len: 8}
		if e.Kind == KindWrite {
			e.Data = []byte("abcdefgh")
		}
		m.Entries = append(m.Entries, e)
	}
	return m
}

// TestRoundTrip: every message decodes to what was encoded.
func TestRoundTrip(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for range 2000 {
		m := randMsg(rng)
		f := Encode(m)
		got, err := Decode(f)
		if err != nil {
			t.Fatalf("decode %v: %v", m, err)
		}
		if !reflect.DeepEqual(got, m) {
			t.Fatalf("round trip:\n got %#v\nwant %#v", got, m)
		}
		n, err := BodyLen(f[:HeaderSize])
		if err != nil || n != len(f)-HeaderSize {
			t.Fatalf("BodyLen = %d, %v; want %d", n, err, len(f)-HeaderSize)
		}
		if len(f) > maxSize(m) {
			t.Fatalf("frame of %d bytes past maxSize %d: Encode grew its buffer", len(f), maxSize(m))
		}
	}
}

// TestHeartbeatSize: a heartbeat stays small.
func TestHeartbeatSize(t *testing.T) {
	m := &Msg{Type: TypeAppend, Epoch: 7, From: "n1", To: "n2", PrevEpoch: 7, PrevOp: 123456, Commit: 123450}
	if n := len(Encode(m)); n > 64 {
		t.Fatalf("heartbeat is %d bytes", n)
	}
}

// TestCorruption: any flipped bit is caught.
func TestCorruption(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	for range 500 {
		f := Encode(randMsg(rng))
		i := rng.IntN(len(f))
		f[i] ^= 1 << rng.IntN(8)
		if _, err := Decode(f); err == nil {
			t.Fatalf("flip at byte %d not detected", i)
		}
	}
	f := Encode(randMsg(rng))
	if _, err := Decode(f[:len(f)-1]); !errors.Is(err, ErrFormat) {
		t.Fatalf("short frame: %v", err)
	}
	f[4] = 9
	if _, err := Decode(f); !errors.Is(err, ErrVersion) {
		t.Fatalf("bad version: %v", err)
	}
}

func FuzzDecode(f *testing.F) {
	rng := rand.New(rand.NewPCG(5, 6))
	for range 20 {
		f.Add(Encode(randMsg(rng)))
	}
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := Decode(b)
		if err != nil {
			return
		}
		// What decodes re-encodes to the same frame.
		if got := Encode(m); string(got) != string(b) {
			t.Fatalf("re-encode differs")
		}
	})
}

func BenchmarkEncodeAppend4K(b *testing.B) {
	m := &Msg{Type: TypeAppend, Epoch: 7, From: "n1", To: "n2", PrevOp: 100, Commit: 99,
		Entries: []Entry{{Epoch: 7, OpNum: 101, Kind: KindWrite, Off: 4096, Len: 4096, Data: make([]byte, 4096)}}}
	var buf []byte
	b.SetBytes(4096)
	b.ReportAllocs()
	for b.Loop() {
		buf = Append(buf[:0], m)
	}
}

func BenchmarkDecodeAppend4K(b *testing.B) {
	m := &Msg{Type: TypeAppend, Epoch: 7, From: "n1", To: "n2", PrevOp: 100, Commit: 99,
		Entries: []Entry{{Epoch: 7, OpNum: 101, Kind: KindWrite, Off: 4096, Len: 4096, Data: make([]byte, 4096)}}}
	f := Encode(m)
	b.SetBytes(4096)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := Decode(f); err != nil {
			b.Fatal(err)
		}
	}
}
