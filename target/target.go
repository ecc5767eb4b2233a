// Package target is the seam between the protocol servers (target/nbd,
// target/iscsi) and the storage beneath them.
//
// A protocol server sees exactly one thing: a BlockDevice, found by name in a
// Catalog. It knows nothing of partitions, replicas, journals or sleds, and
// the storage knows nothing of NBD or SCSI. Each protocol maps the errors
// below to its own codes in one table.
//
// Rules every BlockDevice keeps:
//   - All methods are safe for concurrent use by many goroutines and many
//     connections at once.
//   - No short I/O: an operation either covers its whole range or returns an
//     error. Ranges are in bytes and must be multiples of the logical block
//     size and lie inside [0, Geometry().Size); otherwise ErrOutOfRange or
//     ErrInvalid, and nothing is changed.
//   - A completed WriteAt/WriteZeroes/Trim is visible to every later ReadAt,
//     on any connection (NBD CAN_MULTI_CONN is true in fact).
//   - Flush returns once every write completed before Flush was called is
//     durable (survives power loss). A write with fua=true is durable when it
//     returns.
//   - A 4 KiB aligned write is never torn: a later read sees all of it or
//     none of it, also after a crash.
package target

import (
	"context"
	"errors"
)

// Errors a BlockDevice returns, alone or wrapped with %w. Protocol servers
// map them with errors.Is; anything else is reported as an I/O error.
var (
	ErrOutOfRange   = errors.New("target: range outside the device")
	ErrInvalid      = errors.New("target: invalid request")
	ErrNoSpace      = errors.New("target: no space left")
	ErrIO           = errors.New("target: I/O error")
	ErrReadOnly     = errors.New("target: device is read-only")
	ErrNotSupported = errors.New("target: operation not supported")
	ErrNotFound     = errors.New("target: no such export")
	ErrClosed       = errors.New("target: device closed")
)

// Geometry describes a device as an initiator sees it. It may change between
// opens (a volume grows); an open Device keeps the geometry it was opened with.
type Geometry struct {
	Size      int64 // bytes, a multiple of BlockSize
	BlockSize int   // logical block size in bytes: 512 or 4096
	ReadOnly  bool
}

// Blocks is the device size in logical blocks.
func (g Geometry) Blocks() int64 { return g.Size / int64(g.BlockSize) }

// Check reports whether [off, off+n) is a valid block-aligned range of the
// device: ErrInvalid for misalignment or negative values, ErrOutOfRange for
// a range that ends past the device.
func (g Geometry) Check(off, n int64) error {
	bs := int64(g.BlockSize)
	if off < 0 || n < 0 || off%bs != 0 || n%bs != 0 {
		return ErrInvalid
	}
	if off > g.Size || n > g.Size-off {
		return ErrOutOfRange
	}
	return nil
}

// BlockDevice is a virtual disk. See the package doc for the rules.
type BlockDevice interface {
	// ReadAt fills p from offset off. Unwritten, trimmed and zeroed ranges
	// read as zeros.
	ReadAt(ctx context.Context, p []byte, off int64) error
	// WriteAt writes p at off. With fua the data is durable on return.
	// The device does not keep p after return.
	WriteAt(ctx context.Context, p []byte, off int64, fua bool) error
	// WriteZeroes makes [off, off+n) read as zeros. It is metadata only:
	// no zero bytes are stored. With fua it is durable on return.
	WriteZeroes(ctx context.Context, off, n int64, fua bool) error
	// Trim discards [off, off+n); it then reads as zeros (LBPRZ) and holds
	// no space.
	Trim(ctx context.Context, off, n int64) error
	// Flush makes every write completed before the call durable.
	Flush(ctx context.Context) error
	// Geometry is fixed for the life of the value.
	Geometry() Geometry
}

// AsyncWriter is implemented by devices that can start a write without
// waiting for it: a protocol server then needs no goroutine per write in
// flight, and the device's completion can send the reply itself.
type AsyncWriter interface {
	// WriteAtAsync starts WriteAt(ctx, p, off, fua) and calls done with its
	// result exactly once, on any goroutine, perhaps before it returns.
	// p must stay unchanged until done is called. done must not block:
	// it may run on the device's own delivery path.
	WriteAtAsync(ctx context.Context, p []byte, off int64, fua bool, done func(error))
}

// ExtentKind says what backs a range of a device.
type ExtentKind uint8

const (
	ExtentData ExtentKind = iota // allocated, holds written data
	ExtentZero                   // reads as zeros, allocated nothing (WRITE_ZEROES)
	ExtentHole                   // never written or trimmed: reads as zeros, holds no space
)

// Extent is one run of a device's allocation map.
type Extent struct {
	Off, Len int64
	Kind     ExtentKind
}

// Mapper is implemented by devices that can report their allocation map
// (NBD BLOCK_STATUS base:allocation, SCSI GET LBA STATUS).
type Mapper interface {
	// Map describes [off, off+n) as consecutive extents covering the range
	// exactly, adjacent extents of one kind merged. It may stop early and
	// return a prefix covering at least one block.
	Map(ctx context.Context, off, n int64) ([]Extent, error)
}

// Export names a device a Catalog offers.
type Export struct {
	Name        string // NBD export name; the last part of the iSCSI IQN
	ID          string // stable unique id: SCSI serial, NAA designator source
	Description string
}

// Device is an opened export. Close releases it; the device must not be used
// afterwards. A Catalog counts open Devices to refuse deleting a volume in use.
type Device interface {
	BlockDevice
	Info() Export
	Close() error
}

// Catalog is the set of exports a protocol server offers. Safe for
// concurrent use.
type Catalog interface {
	// List returns every export, sorted by name.
	List(ctx context.Context) ([]Export, error)
	// Open attaches to the export called name, or returns ErrNotFound.
	Open(ctx context.Context, name string) (Device, error)
}
