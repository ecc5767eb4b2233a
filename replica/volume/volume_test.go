package volume

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"math/rand"
	"sync/atomic"
	"testing"

	"github.com/cockroachdb/pebble/vfs"

	"stor.dev/stor/ctl/api"
	"stor.dev/stor/target"
	"stor.dev/stor/target/blockdevtest"
)

func openManager(t testing.TB, fs vfs.FS, dir string) *Manager {
	t.Helper()
	m, err := OpenManager(context.Background(), Config{Dir: dir, FS: fs, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func TestVolumeLifecycle(t *testing.T) {
	ctx := context.Background()
	fs := vfs.NewMem()
	m := openManager(t, fs, "d")
	if _, err := m.CreateVolume(ctx, api.CreateVolume{Name: "a", Size: 8 << 20, PartitionSize: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	for _, bad := range []api.CreateVolume{
		{Name: "a", Size: 1 << 20},
		{Name: "Bad Name", Size: 1 << 20},
		{Name: "b", Size: 1000},
		{Name: "b", Size: 1 << 20, BlockSize: 1024},
		{Name: "b", Size: 1 << 20, PartitionSize: 4096},
	} {
		if _, err := m.CreateVolume(ctx, bad); err == nil {
			t.Errorf("create %+v succeeded", bad)
		}
	}
	dev, err := m.Open(ctx, "a")
	if err != nil {
		t.Fatal(err)
	}
	// A write crossing the partition boundary at 1 MiB.
	data := bytes.Repeat([]byte{0x5a}, 8192)
	if err := dev.WriteAt(ctx, data, 1<<20-4096, false); err != nil {
		t.Fatal(err)
	}
	if err := dev.WriteAt(ctx, data, 8<<20-4096, false); !errors.Is(err, target.ErrOutOfRange) {
		t.Fatalf("write past the end: %v", err)
	}
	if err := m.DeleteVolume(ctx, "a", false); !errors.Is(err, api.ErrInUse) {
		t.Fatalf("delete while open: %v", err)
	}
	if _, err := m.ResizeVolume(ctx, "a", 4<<20); !errors.Is(err, api.ErrInvalid) {
		t.Fatalf("shrink: %v", err)
	}
	if _, err := m.ResizeVolume(ctx, "a", 16<<20); err != nil {
		t.Fatal(err)
	}
	if dev.Geometry().Size != 8<<20 {
		t.Fatal("an open device changed size")
	}
	dev.Close()
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	m = openManager(t, fs, "d")
	dev, err = m.Open(ctx, "a")
	if err != nil {
		t.Fatal(err)
	}
	if dev.Geometry().Size != 16<<20 {
		t.Fatalf("size after reopen = %d", dev.Geometry().Size)
	}
	got := make([]byte, 8192)
	if err := dev.ReadAt(ctx, got, 1<<20-4096); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("read after reopen: %v", err)
	}
	ext, err := dev.(target.Mapper).Map(ctx, 0, 2<<20)
	if err != nil {
		t.Fatal(err)
	}
	want := []target.Extent{
		{Off: 0, Len: 1<<20 - 4096, Kind: target.ExtentHole},
		{Off: 1<<20 - 4096, Len: 8192, Kind: target.ExtentData},
		{Off: 1<<20 + 4096, Len: 1<<20 - 4096, Kind: target.ExtentHole},
	}
	if len(ext) != 3 || ext[0] != want[0] || ext[1] != want[1] || ext[2] != want[2] {
		t.Fatalf("map = %+v", ext)
	}
	if err := m.DeleteVolume(ctx, "a", true); err != nil {
		t.Fatal(err)
	}
	if err := dev.ReadAt(ctx, got, 0); err == nil {
		t.Fatal("read of a deleted volume succeeded")
	}
	dev.Close()
	if vs, _ := m.Volumes(ctx); len(vs) != 0 {
		t.Fatalf("volumes after delete: %v", vs)
	}
	m.Close()
}

func benchDevice(b *testing.B, write bool) {
	ctx := context.Background()
	m := openManager(b, vfs.Default, b.TempDir())
	defer m.Close()
	const size = 256 << 20
	if _, err := m.CreateVolume(ctx, api.CreateVolume{Name: "b", Size: size, BlockSize: 4096}); err != nil {
		b.Fatal(err)
	}
	dev, _ := m.Open(ctx, "b")
	defer dev.Close()
	buf := make([]byte, 1<<20)
	for off := int64(0); off < size; off += int64(len(buf)) {
		dev.WriteAt(ctx, buf, off, false)
	}
	var seed atomic.Int64
	b.SetBytes(4096)
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		rng := rand.New(rand.NewSource(seed.Add(1)))
		p := make([]byte, 4096)
		for pb.Next() {
			off := int64(rng.Intn(size/4096)) * 4096
			var err error
			if write {
				err = dev.WriteAt(ctx, p, off, false)
			} else {
				err = dev.ReadAt(ctx, p, off)
			}
			if err != nil {
				b.Fatal(err)
			}
		}
	})
}

func BenchmarkRead4K(b *testing.B)  { benchDevice(b, false) }
func BenchmarkWrite4K(b *testing.B) { benchDevice(b, true) }

// TestConformance runs the BlockDevice conformance suite against a volume
// that spans several partitions.
func TestConformance(t *testing.T) {
	blockdevtest.Run(t, func(t *testing.T, geo target.Geometry) target.BlockDevice {
		ctx := context.Background()
		m := openManager(t, vfs.NewMem(), "d")
		t.Cleanup(func() { m.Close() })
		if _, err := m.CreateVolume(ctx, api.CreateVolume{Name: "c", Size: geo.Size, BlockSize: geo.BlockSize, PartitionSize: 1 << 20}); err != nil {
			t.Fatal(err)
		}
		dev, err := m.Open(ctx, "c")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { dev.Close() })
		return dev
	})
}
