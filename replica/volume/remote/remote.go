// Package remote is the volume client of a replicated volume: a
// target.BlockDevice whose partitions are replica sets on other nodes,
// reached through one replica.Client each.
//
// # Model
//
//	ReadAt/WriteAt/WriteZeroes/Trim (protocol server's goroutine)
//	   |  geometry check, then split at partition boundaries
//	   v
//	piece 0 --> clients[i]   .Write(ctx, p[..], off-i*psize, fua)   (this goroutine)
//	piece 1 --> clients[i+1] .Write(...)                            (a goroutine per
//	  ...                                                            further piece)
//	   |  wait for every piece
//	   v
//	nil, or the first piece's error
//
//	Flush --> every client's Flush, concurrently
//
//	WriteAtAsync (target.AsyncWriter): within one partition, its client's
//	WriteAsync, whose completion (on the goroutine that delivers the
//	accepted Reply) calls done; across partitions, WriteAt on a goroutine.
//
// Partition i covers device bytes [i*psize, (i+1)*psize); the last one may
// be cut short by the device size. A piece is sent to its partition's
// Client with offsets relative to the partition. A Device keeps no state
// beyond its configuration and starts no goroutine that outlives a call
// (WriteAtAsync's end with their done), so it needs no Close.
//
// # Rules
//
//   - Ranges are checked with the Geometry before anything is sent, as the
//     single-node volume.Device does: target.ErrReadOnly for a mutation of
//     a read-only device (checked first), then target.ErrInvalid for
//     misalignment or negative values and target.ErrOutOfRange for a range
//     past the end; a refused request changes nothing. An empty range
//     succeeds at once.
//   - Stall, not error. A replica.Client retries a request, under the same
//     request id, on whichever replica is primary, until its context ends
//     (see replica/remote.go). So while any replica of every partition a
//     request touches can become primary, the initiator sees the request
//     stall across a failover, never fail. The errors a caller can see are
//     the context's (a write may or may not have been applied),
//     target.ErrInvalid for a request no replica would serve, target.ErrIO
//     for a read a primary could not read, and replica.ErrBadReply.
//   - The pieces of one request run concurrently, each on its own
//     partition. When one fails, the others are cancelled (they may or may
//     not have been applied) and the caller gets the failed piece's error.
//   - Atomicity: a request split across partitions is not atomic as a
//     whole — a crash or an error may leave some pieces applied and others
//     not — but every 4 KiB aligned block of it is (the partition size is
//     a multiple of 4 KiB, so no such block straddles two partitions, and
//     a replica.Client request is atomic per block).
//   - FUA is per piece: a fua write returns once each of its pieces was
//     flushed on its own partition. Flush flushes every partition, so it
//     covers every write completed before it, on any partition.
//   - Visibility: a completed write is committed on its partition's
//     primary, and reads go through the primary's log, so every later
//     ReadAt, from any connection, sees it.
//   - Safe for concurrent use; concurrent writes to one block are ordered
//     by the partition's log, in an order the caller cannot choose.
package remote

import (
	"context"
	"fmt"
	"sync"

	"stor.dev/stor/replica"
	"stor.dev/stor/target"
)

// atomicUnit is the write size the replicated partitions never tear; a
// partition boundary must not cut one.
const atomicUnit = 4096

// Device is a target.BlockDevice over the partitions of one replicated
// volume. See the package doc.
type Device struct {
	geo     target.Geometry
	psize   int64
	clients []*replica.Client // partition i's, in LBA order
}

var (
	_ target.BlockDevice = (*Device)(nil)
	_ target.AsyncWriter = (*Device)(nil)
)

// NewDevice returns the Device of a volume of geometry geo split into
// partitions of partitionSize bytes; clients[i] reaches partition i's
// replica set. It panics on a configuration no volume has: a partition
// size that is not a positive multiple of 4 KiB and of the block size, a
// size that is not a multiple of the block size, or not exactly one
// non-nil client per partition the size covers.
func NewDevice(geo target.Geometry, partitionSize int64, clients []*replica.Client) *Device {
	bs := int64(geo.BlockSize)
	if bs != 512 && bs != 4096 {
		panic(fmt.Sprintf("remote: NewDevice: block size %d, want 512 or 4096", bs))
	}
	if geo.Size < 0 || geo.Size%bs != 0 {
		panic(fmt.Sprintf("remote: NewDevice: size %d is not a multiple of the block size %d", geo.Size, bs))
	}
	if partitionSize <= 0 || partitionSize%atomicUnit != 0 || partitionSize%bs != 0 {
		panic(fmt.Sprintf("remote: NewDevice: partition size %d is not a positive multiple of %d", partitionSize, atomicUnit))
	}
	parts := (geo.Size + partitionSize - 1) / partitionSize
	if int64(len(clients)) != parts {
		panic(fmt.Sprintf("remote: NewDevice: %d clients for %d partitions of %d bytes in %d", len(clients), parts, partitionSize, geo.Size))
	}
	for i, c := range clients {
		if c == nil {
			panic(fmt.Sprintf("remote: NewDevice: no client for partition %d", i))
		}
	}
	return &Device{geo: geo, psize: partitionSize, clients: append([]*replica.Client(nil), clients...)}
}

// Geometry is the geometry NewDevice was given.
func (d *Device) Geometry() target.Geometry { return d.geo }

// piece is the part of a request that falls in one partition.
type piece struct {
	part int   // partition index
	poff int64 // offset within the partition
	roff int64 // offset within the request
	n    int64
}

// wrap is err of the piece p of a request op [off, off+n).
func (p piece) wrap(op string, off, n int64, err error) error {
	return fmt.Errorf("remote: %s [%d,+%d) partition %d [%d,+%d): %w", op, off, n, p.part, p.poff, p.n, err)
}

// split checks [off, off+n) and cuts it at partition boundaries.
func (d *Device) split(off, n int64) ([]piece, error) {
	if err := d.geo.Check(off, n); err != nil {
		return nil, fmt.Errorf("remote: [%d,+%d) of a %d-byte device: %w", off, n, d.geo.Size, err)
	}
	var ps []piece
	for roff := int64(0); roff < n; {
		at := off + roff
		poff := at % d.psize
		rn := min(n-roff, d.psize-poff)
		ps = append(ps, piece{part: int(at / d.psize), poff: poff, roff: roff, n: rn})
		roff += rn
	}
	return ps, nil
}

// run calls fn for every piece, concurrently, and returns the first
// error: a failed piece cancels the others. Every goroutine it starts has
// returned when it returns.
func run(ctx context.Context, ps []piece, fn func(ctx context.Context, c piece) error) error {
	switch len(ps) {
	case 0:
		return nil
	case 1:
		return fn(ctx, ps[0])
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var (
		wg    sync.WaitGroup
		once  sync.Once
		first error
	)
	do := func(p piece) {
		if err := fn(ctx, p); err != nil {
			once.Do(func() {
				first = err
				cancel()
			})
		}
	}
	for _, p := range ps[1:] {
		wg.Add(1)
		go func() {
			defer wg.Done()
			do(p)
		}()
	}
	do(ps[0])
	wg.Wait()
	return first
}

// each checks and splits [off, off+n) and runs fn on every piece with its
// partition's client.
func (d *Device) each(ctx context.Context, op string, off, n int64, fn func(ctx context.Context, c *replica.Client, p piece) error) error {
	ps, err := d.split(off, n)
	if err != nil {
		return err
	}
	return run(ctx, ps, func(ctx context.Context, p piece) error {
		if err := fn(ctx, d.clients[p.part], p); err != nil {
			return p.wrap(op, off, n, err)
		}
		return nil
	})
}

func (d *Device) writable() error {
	if d.geo.ReadOnly {
		return target.ErrReadOnly
	}
	return nil
}

// ReadAt fills p from off: each piece from its partition's primary, after
// every write committed before the read.
func (d *Device) ReadAt(ctx context.Context, p []byte, off int64) error {
	return d.each(ctx, "read", off, int64(len(p)), func(ctx context.Context, c *replica.Client, pc piece) error {
		return c.ReadAt(ctx, p[pc.roff:pc.roff+pc.n], pc.poff)
	})
}

// WriteAt writes p at off; with fua each piece is flushed on its
// partition before WriteAt returns.
func (d *Device) WriteAt(ctx context.Context, p []byte, off int64, fua bool) error {
	if err := d.writable(); err != nil {
		return err
	}
	return d.each(ctx, "write", off, int64(len(p)), func(ctx context.Context, c *replica.Client, pc piece) error {
		return c.Write(ctx, p[pc.roff:pc.roff+pc.n], pc.poff, fua)
	})
}

// WriteAtAsync is WriteAt without waiting (target.AsyncWriter): a write
// within one partition goes to its Client's WriteAsync; one that spans
// partitions runs WriteAt on a goroutine of its own.
func (d *Device) WriteAtAsync(ctx context.Context, p []byte, off int64, fua bool, done func(error)) {
	if err := d.writable(); err != nil {
		done(err)
		return
	}
	ps, err := d.split(off, int64(len(p)))
	switch {
	case err != nil:
		done(err)
	case len(ps) == 0:
		done(nil)
	case len(ps) > 1:
		go func() { done(d.WriteAt(ctx, p, off, fua)) }()
	default:
		pc := ps[0]
		d.clients[pc.part].WriteAsync(ctx, p, pc.poff, fua, func(err error) {
			if err != nil {
				err = pc.wrap("write", off, int64(len(p)), err)
			}
			done(err)
		})
	}
}

// WriteZeroes makes [off, off+n) read as zeros (metadata only).
func (d *Device) WriteZeroes(ctx context.Context, off, n int64, fua bool) error {
	if err := d.writable(); err != nil {
		return err
	}
	return d.each(ctx, "write-zeroes", off, n, func(ctx context.Context, c *replica.Client, pc piece) error {
		return c.WriteZeroes(ctx, pc.poff, pc.n, fua)
	})
}

// Trim discards [off, off+n); it reads as zeros after.
func (d *Device) Trim(ctx context.Context, off, n int64) error {
	if err := d.writable(); err != nil {
		return err
	}
	return d.each(ctx, "trim", off, n, func(ctx context.Context, c *replica.Client, pc piece) error {
		return c.Trim(ctx, pc.poff, pc.n)
	})
}

// Flush flushes every partition, concurrently: it returns once every
// write completed before the call is durable on every in-sync replica of
// its partition.
func (d *Device) Flush(ctx context.Context) error {
	ps := make([]piece, len(d.clients))
	for i := range ps {
		ps[i].part = i
	}
	return run(ctx, ps, func(ctx context.Context, p piece) error {
		if err := d.clients[p.part].Flush(ctx); err != nil {
			return fmt.Errorf("remote: flush partition %d: %w", p.part, err)
		}
		return nil
	})
}
