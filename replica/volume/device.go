package volume

import (
	"context"
	"fmt"
	"sync/atomic"
	"time"

	"stor.dev/stor/replica"
	"stor.dev/stor/target"
)

// Device is an open volume: a target.BlockDevice that splits each request
// at partition boundaries and sends the pieces to the partitions.
type Device struct {
	v      *vol
	geo    target.Geometry
	info   target.Export
	closed atomic.Bool
}

var (
	_ target.Device = (*Device)(nil)
	_ target.Mapper = (*Device)(nil)
)

func (d *Device) Geometry() target.Geometry { return d.geo }
func (d *Device) Info() target.Export       { return d.info }

// Close detaches from the volume.
func (d *Device) Close() error {
	if !d.closed.Swap(true) {
		d.v.attached.Add(-1)
	}
	return nil
}

// each runs fn for every partition piece of [off, off+n): the partition,
// the offset within it, and the offset within the request.
func (d *Device) each(ctx context.Context, op opKind, off, n int64, fn func(p *replica.Partition, poff, roff, rn int64) error) (err error) {
	if d.closed.Load() {
		return target.ErrClosed
	}
	if err := d.geo.Check(off, n); err != nil {
		return err
	}
	if n == 0 {
		return nil
	}
	start := time.Now()
	d.v.met.begin()
	defer func() { d.v.met.end(op, n, start, err) }()
	d.v.io.RLock()
	defer d.v.io.RUnlock()
	if d.v.deleted {
		return fmt.Errorf("%w: volume %s was deleted", target.ErrIO, d.info.Name)
	}
	psize := d.v.rec.Load().PartitionSize
	for roff := int64(0); roff < n; {
		at := off + roff
		idx := uint32(at / psize)
		poff := at % psize
		rn := min(n-roff, psize-poff)
		p, err := d.v.part(ctx, idx)
		if err != nil {
			return fmt.Errorf("%w: %v", target.ErrIO, err)
		}
		if err := fn(p, poff, roff, rn); err != nil {
			return err
		}
		roff += rn
	}
	return nil
}

func (d *Device) ReadAt(ctx context.Context, buf []byte, off int64) error {
	return d.each(ctx, opRead, off, int64(len(buf)), func(p *replica.Partition, poff, roff, rn int64) error {
		return p.ReadAt(ctx, buf[roff:roff+rn], poff)
	})
}

func (d *Device) writable() error {
	if d.geo.ReadOnly {
		return target.ErrReadOnly
	}
	return nil
}

func (d *Device) WriteAt(ctx context.Context, buf []byte, off int64, fua bool) error {
	if err := d.writable(); err != nil {
		return err
	}
	return d.each(ctx, opWrite, off, int64(len(buf)), func(p *replica.Partition, poff, roff, rn int64) error {
		return p.Write(ctx, buf[roff:roff+rn], poff, fua)
	})
}

func (d *Device) WriteZeroes(ctx context.Context, off, n int64, fua bool) error {
	if err := d.writable(); err != nil {
		return err
	}
	return d.each(ctx, opZero, off, n, func(p *replica.Partition, poff, roff, rn int64) error {
		return p.WriteZeroes(ctx, poff, rn, fua)
	})
}

func (d *Device) Trim(ctx context.Context, off, n int64) error {
	if err := d.writable(); err != nil {
		return err
	}
	return d.each(ctx, opTrim, off, n, func(p *replica.Partition, poff, roff, rn int64) error {
		return p.Trim(ctx, poff, rn)
	})
}

// Flush syncs every open partition of the volume (group commit in each
// journal; partitions with nothing new return at once).
func (d *Device) Flush(ctx context.Context) (err error) {
	if d.closed.Load() {
		return target.ErrClosed
	}
	start := time.Now()
	d.v.met.begin()
	defer func() { d.v.met.end(opFlush, 0, start, err) }()
	d.v.io.RLock()
	defer d.v.io.RUnlock()
	if d.v.deleted {
		return fmt.Errorf("%w: volume %s was deleted", target.ErrIO, d.info.Name)
	}
	for _, p := range d.v.partitions() {
		if err := p.Sync(ctx); err != nil {
			return err
		}
	}
	return nil
}

func (d *Device) Map(ctx context.Context, off, n int64) ([]target.Extent, error) {
	var out []target.Extent
	err := d.each(ctx, opMap, off, n, func(p *replica.Partition, poff, roff, rn int64) error {
		ext, err := p.Map(ctx, poff, rn)
		if err != nil {
			return err
		}
		for _, e := range ext {
			e.Off += off + roff - poff
			if i := len(out); i > 0 && out[i-1].Kind == e.Kind && out[i-1].Off+out[i-1].Len == e.Off {
				out[i-1].Len += e.Len
				continue
			}
			out = append(out, e)
		}
		return nil
	})
	return out, err
}
