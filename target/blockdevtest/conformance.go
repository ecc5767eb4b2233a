package blockdevtest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"testing"

	"stor.dev/stor/target"
)

// ConformanceSize is the size of the devices Run asks for.
const ConformanceSize = 4 << 20

// Run checks that the devices open returns keep the target.BlockDevice
// contract (see package target): read-your-writes, zeros where nothing was
// written, trim and write-zeroes reading back as zeros, the Map of a
// target.Mapper agreeing with the data, ErrOutOfRange and ErrInvalid for
// bad ranges with nothing changed, and concurrent writers on disjoint
// blocks with readers never seeing a torn 4 KiB write. Every check runs for
// 512- and 4096-byte blocks.
//
// open is called once per subtest and must return a new, all-zero device
// of exactly the geometry asked for (a ReadOnly request may be ignored: the
// read-only checks then skip). Run with -race.
func Run(t *testing.T, open func(t *testing.T, geo target.Geometry) target.BlockDevice) {
	for _, bs := range []int{512, 4096} {
		t.Run(fmt.Sprintf("bs=%d", bs), func(t *testing.T) {
			geo := target.Geometry{Size: ConformanceSize, BlockSize: bs}
			dev := func(t *testing.T) target.BlockDevice {
				t.Helper()
				d := open(t, geo)
				if g := d.Geometry(); g.Size != geo.Size || g.BlockSize != geo.BlockSize || g.ReadOnly {
					t.Fatalf("Geometry() = %+v, want %+v", g, geo)
				}
				return d
			}
			t.Run("UnwrittenReadsZero", func(t *testing.T) { testUnwritten(t, dev(t)) })
			t.Run("ReadYourWrites", func(t *testing.T) { testReadYourWrites(t, dev(t)) })
			t.Run("TrimAndWriteZeroesReadZero", func(t *testing.T) { testDiscard(t, dev(t)) })
			t.Run("Map", func(t *testing.T) { testMap(t, dev(t)) })
			t.Run("BadRanges", func(t *testing.T) { testBadRanges(t, dev(t)) })
			t.Run("Concurrent", func(t *testing.T) { testConcurrent(t, dev(t)) })
			t.Run("ReadOnly", func(t *testing.T) {
				ro := geo
				ro.ReadOnly = true
				testReadOnly(t, open(t, ro))
			})
		})
	}
}

// ctx is the context of every call the suite makes.
var ctx = context.Background()

// shadow is the oracle: the bytes the device should hold, and the kind of
// the last operation on each block.
type shadow struct {
	data []byte
	kind []target.ExtentKind
	bs   int64
}

func newShadow(geo target.Geometry) *shadow {
	return &shadow{data: make([]byte, geo.Size), kind: make([]target.ExtentKind, geo.Blocks()), bs: int64(geo.BlockSize)}
}

func (s *shadow) set(off int64, p []byte, kind target.ExtentKind) {
	copy(s.data[off:], p)
	for b := off / s.bs; b < (off+int64(len(p)))/s.bs; b++ {
		s.kind[b] = kind
	}
}

func mustRead(t *testing.T, d target.BlockDevice, off, n int64) []byte {
	t.Helper()
	p := make([]byte, n)
	for i := range p {
		p[i] = 0xee // stale garbage the device must overwrite
	}
	if err := d.ReadAt(ctx, p, off); err != nil {
		t.Fatalf("ReadAt(%d, %d): %v", off, n, err)
	}
	return p
}

func checkRange(t *testing.T, d target.BlockDevice, s *shadow, off, n int64) {
	t.Helper()
	got := mustRead(t, d, off, n)
	if want := s.data[off : off+n]; !bytes.Equal(got, want) {
		i := 0
		for got[i] == want[i] {
			i++
		}
		t.Fatalf("ReadAt(%d, %d): byte %d is %#x, want %#x", off, n, off+int64(i), got[i], want[i])
	}
}

func randBytes(rng *rand.Rand, n int64) []byte {
	p := make([]byte, n)
	for i := range p {
		p[i] = byte(rng.Uint32()) | 1 // never zero: data is told from zeros
	}
	return p
}

// randRange picks an aligned range of 1..maxBlocks blocks inside the device.
func randRange(rng *rand.Rand, geo target.Geometry, maxBlocks int64) (off, n int64) {
	bs := int64(geo.BlockSize)
	nb := 1 + rng.Int64N(maxBlocks)
	off = rng.Int64N(geo.Blocks()-nb+1) * bs
	return off, nb * bs
}

func testUnwritten(t *testing.T, d target.BlockDevice) {
	got := mustRead(t, d, 0, d.Geometry().Size)
	if !bytes.Equal(got, make([]byte, len(got))) {
		t.Fatal("a new device does not read as zeros")
	}
}

func testReadYourWrites(t *testing.T, d target.BlockDevice) {
	geo := d.Geometry()
	s := newShadow(geo)
	rng := rand.New(rand.NewPCG(1, uint64(geo.BlockSize)))
	for i := range 200 {
		off, n := randRange(rng, geo, 64)
		p := randBytes(rng, n)
		s.set(off, p, target.ExtentData)
		if err := d.WriteAt(ctx, p, off, i%3 == 0); err != nil {
			t.Fatalf("WriteAt(%d, %d): %v", off, n, err)
		}
		clear(p) // the device must not keep p
		ro, rn := randRange(rng, geo, 128)
		checkRange(t, d, s, ro, rn)
		checkRange(t, d, s, off, n)
	}
	if err := d.Flush(ctx); err != nil {
		t.Fatalf("Flush: %v", err)
	}
	checkRange(t, d, s, 0, geo.Size)
}

func testDiscard(t *testing.T, d target.BlockDevice) {
	geo := d.Geometry()
	s := newShadow(geo)
	rng := rand.New(rand.NewPCG(2, uint64(geo.BlockSize)))
	all := randBytes(rng, geo.Size)
	if err := d.WriteAt(ctx, all, 0, false); err != nil {
		t.Fatalf("WriteAt whole device: %v", err)
	}
	s.set(0, all, target.ExtentData)
	for i := range 100 {
		off, n := randRange(rng, geo, 32)
		var err error
		kind := target.ExtentHole
		switch i % 3 {
		case 0:
			err = d.Trim(ctx, off, n)
		case 1:
			err, kind = d.WriteZeroes(ctx, off, n, false), target.ExtentZero
		case 2:
			err, kind = d.WriteZeroes(ctx, off, n, true), target.ExtentZero
		}
		if err != nil {
			t.Fatalf("op %d at (%d, %d): %v", i, off, n, err)
		}
		s.set(off, make([]byte, n), kind)
		checkRange(t, d, s, max(0, off-int64(geo.BlockSize)), min(geo.Size-max(0, off-int64(geo.BlockSize)), n+2*int64(geo.BlockSize)))
		if i%10 == 0 {
			wo, wn := randRange(rng, geo, 8)
			p := randBytes(rng, wn)
			if err := d.WriteAt(ctx, p, wo, false); err != nil {
				t.Fatal(err)
			}
			s.set(wo, p, target.ExtentData)
		}
	}
	checkRange(t, d, s, 0, geo.Size)
}

func testMap(t *testing.T, d target.BlockDevice) {
	m, ok := d.(target.Mapper)
	if !ok {
		t.Skip("device is not a target.Mapper")
	}
	geo := d.Geometry()
	bs := int64(geo.BlockSize)
	s := newShadow(geo)
	for b := range s.kind {
		s.kind[b] = target.ExtentHole
	}
	rng := rand.New(rand.NewPCG(3, uint64(bs)))
	for i := range 60 {
		off, n := randRange(rng, geo, 48)
		switch i % 4 {
		case 0, 1:
			p := randBytes(rng, n)
			if err := d.WriteAt(ctx, p, off, false); err != nil {
				t.Fatal(err)
			}
			s.set(off, p, target.ExtentData)
		case 2:
			if err := d.Trim(ctx, off, n); err != nil {
				t.Fatal(err)
			}
			s.set(off, make([]byte, n), target.ExtentHole)
		case 3:
			if err := d.WriteZeroes(ctx, off, n, false); err != nil {
				t.Fatal(err)
			}
			s.set(off, make([]byte, n), target.ExtentZero)
		}
	}
	checkMap := func(off, n int64) {
		t.Helper()
		pos, end := off, off+n
		for pos < end {
			ext, err := m.Map(ctx, pos, end-pos)
			if err != nil {
				t.Fatalf("Map(%d, %d): %v", pos, end-pos, err)
			}
			if len(ext) == 0 {
				t.Fatalf("Map(%d, %d): no extents", pos, end-pos)
			}
			for i, e := range ext {
				if e.Off != pos || e.Len <= 0 || e.Len%bs != 0 || e.Off+e.Len > end {
					t.Fatalf("Map(%d, %d): extent %d %+v does not continue at %d inside the range", off, n, i, e, pos)
				}
				if i > 0 && ext[i-1].Kind == e.Kind {
					t.Fatalf("Map: adjacent extents of one kind not merged: %+v %+v", ext[i-1], e)
				}
				// Data must be reported as data; how a device splits
				// zeros between holes and zero extents is its business,
				// but they must read as zeros (checked below).
				for b := e.Off / bs; b < (e.Off+e.Len)/bs; b++ {
					if e.Kind != target.ExtentData && s.kind[b] == target.ExtentData {
						t.Fatalf("Map: block %d written with data reported as kind %v", b, e.Kind)
					}
				}
				if e.Kind != target.ExtentData {
					if got := mustRead(t, d, e.Off, e.Len); !bytes.Equal(got, make([]byte, e.Len)) {
						t.Fatalf("Map: extent %+v reported as zeros reads non-zero", e)
					}
				}
				pos += e.Len
			}
		}
	}
	checkMap(0, geo.Size)
	for range 20 {
		checkMap(randRange(rng, geo, 100))
	}
	if _, err := m.Map(ctx, geo.Size-bs, 2*bs); !errors.Is(err, target.ErrOutOfRange) {
		t.Errorf("Map past the end: %v, want ErrOutOfRange", err)
	}
	if _, err := m.Map(ctx, 1, bs); !errors.Is(err, target.ErrInvalid) {
		t.Errorf("Map misaligned: %v, want ErrInvalid", err)
	}
}

func testBadRanges(t *testing.T, d target.BlockDevice) {
	geo := d.Geometry()
	bs := int64(geo.BlockSize)
	size := geo.Size
	s := newShadow(geo)
	edge := randBytes(rand.New(rand.NewPCG(4, 4)), 2*bs)
	if err := d.WriteAt(ctx, edge, size-2*bs, false); err != nil {
		t.Fatal(err)
	}
	s.set(size-2*bs, edge, target.ExtentData)
	type op struct {
		name string
		do   func(off, n int64) error
	}
	ops := []op{
		{"ReadAt", func(off, n int64) error { return d.ReadAt(ctx, make([]byte, max(n, 0)), off) }},
		{"WriteAt", func(off, n int64) error { return d.WriteAt(ctx, make([]byte, max(n, 0)), off, false) }},
		{"WriteZeroes", func(off, n int64) error { return d.WriteZeroes(ctx, off, n, false) }},
		{"Trim", func(off, n int64) error { return d.Trim(ctx, off, n) }},
	}
	cases := []struct {
		name   string
		off, n int64
		want   error
	}{
		{"straddles the end", size - bs, 2 * bs, target.ErrOutOfRange},
		{"starts at the end", size, bs, target.ErrOutOfRange},
		{"starts past the end", size + bs, bs, target.ErrOutOfRange},
		{"far past the end", 1 << 60, bs, target.ErrOutOfRange},
		{"misaligned offset", 1, bs, target.ErrInvalid},
		{"misaligned length", 0, bs + 1, target.ErrInvalid},
		{"negative offset", -bs, bs, target.ErrInvalid},
	}
	for _, o := range ops {
		for _, c := range cases {
			if o.name != "ReadAt" && o.name != "WriteAt" && c.name == "misaligned length" {
				c.n = bs / 2 // same check without a buffer
			}
			if err := o.do(c.off, c.n); !errors.Is(err, c.want) {
				t.Errorf("%s %s (%d, %d): %v, want %v", o.name, c.name, c.off, c.n, err, c.want)
			}
		}
	}
	// Nothing changed by the refused operations.
	checkRange(t, d, s, 0, size)
}

func testConcurrent(t *testing.T, d target.BlockDevice) {
	geo := d.Geometry()
	const unit = 4096 // every write is one aligned 4 KiB unit: never torn
	const writers, readers, rounds = 4, 3, 120
	units := geo.Size / unit
	var wg sync.WaitGroup
	errc := make(chan error, writers+readers)
	final := make([][]byte, writers) // per writer: last version of each of its units
	for w := range writers {
		final[w] = make([]byte, units)
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(w), 5))
			buf := make([]byte, unit)
			for r := range rounds {
				// Writer w owns units u with u%writers == w.
				u := int64(rng.IntN(int(units)/writers))*writers + int64(w)
				v := byte(r%250 + 1)
				for i := range buf {
					buf[i] = v
				}
				if err := d.WriteAt(ctx, buf, u*unit, r%7 == 0); err != nil {
					errc <- fmt.Errorf("writer %d: %w", w, err)
					return
				}
				final[w][u] = v
			}
		}()
	}
	for r := range readers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(r), 6))
			buf := make([]byte, unit)
			for range rounds {
				u := rng.Int64N(units)
				if err := d.ReadAt(ctx, buf, u*unit); err != nil {
					errc <- fmt.Errorf("reader %d: %w", r, err)
					return
				}
				for _, b := range buf {
					if b != buf[0] {
						errc <- fmt.Errorf("reader %d: unit %d torn: %#x and %#x", r, u, buf[0], b)
						return
					}
				}
			}
		}()
	}
	wg.Wait()
	close(errc)
	for err := range errc {
		t.Error(err)
	}
	buf := make([]byte, unit)
	for u := range units {
		if err := d.ReadAt(ctx, buf, u*unit); err != nil {
			t.Fatal(err)
		}
		if want := final[u%writers][u]; buf[0] != want || buf[unit-1] != want {
			t.Fatalf("unit %d holds %#x, want the last write %#x", u, buf[0], want)
		}
	}
}

func testReadOnly(t *testing.T, d target.BlockDevice) {
	if !d.Geometry().ReadOnly {
		t.Skip("device ignored the ReadOnly request")
	}
	bs := int64(d.Geometry().BlockSize)
	if err := d.WriteAt(ctx, make([]byte, bs), 0, false); !errors.Is(err, target.ErrReadOnly) {
		t.Errorf("WriteAt on read-only: %v", err)
	}
	if err := d.WriteZeroes(ctx, 0, bs, false); !errors.Is(err, target.ErrReadOnly) {
		t.Errorf("WriteZeroes on read-only: %v", err)
	}
	if err := d.Trim(ctx, 0, bs); !errors.Is(err, target.ErrReadOnly) {
		t.Errorf("Trim on read-only: %v", err)
	}
	mustRead(t, d, 0, bs)
	if err := d.Flush(ctx); err != nil {
		t.Errorf("Flush on read-only: %v", err)
	}
}
