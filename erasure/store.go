// Package erasure is the long-term store behind the head nodes: immutable,
// checksummed shards. Today a Local store on one directory plays the part of
// the sleds behind the same ShardStore interface; the Reed-Solomon stripes
// across k+m sleds implement it later.
//
// Shard file format (Local):
//
//	+------------------+---------------------------+-----------------------+
//	| data (n bytes)   | crc32c of each 4 KiB      | footer: magic u32,    |
//	|                  | block of data, u32 each   | n u64, crc u32 of the |
//	|                  | (last block may be short) | crc table (LE)        |
//	+------------------+---------------------------+-----------------------+
//
// Rules: a shard is written whole by Put (temp file, fsync, rename, fsync
// dir) and never changes; ReadAt verifies the checksum of every 4 KiB block
// it touches and returns ErrChecksum on a mismatch; Delete of a missing
// shard is not an error.
package erasure

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"

	"github.com/cockroachdb/pebble/vfs"

	"stor.dev/stor/erasure/fileio"
)

// Errors.
var (
	ErrNotFound = errors.New("erasure: shard not found")
	ErrChecksum = errors.New("erasure: checksum mismatch")
	ErrNoSpace  = errors.New("erasure: no space left")
)

// ShardID names a shard: the partition key it belongs to and a sequence
// number unique within that partition.
type ShardID struct {
	PKey uint64
	Seq  uint64
}

func (id ShardID) String() string { return fmt.Sprintf("%016x-%016x", id.PKey, id.Seq) }

// ShardStore stores immutable shards. Safe for concurrent use.
type ShardStore interface {
	// Put stores data as shard id; it is durable when Put returns.
	// The store does not keep data.
	Put(ctx context.Context, id ShardID, data []byte) error
	// ReadAt fills p from offset off of the shard; no short reads.
	ReadAt(ctx context.Context, id ShardID, p []byte, off int64) error
	// Delete removes the shard.
	Delete(ctx context.Context, id ShardID) error
	// List returns the shards of partition pkey, by Seq.
	List(ctx context.Context, pkey uint64) ([]ShardID, error)
}

const (
	crcBlock    = 4096
	footerLen   = 16
	footerMagic = 0x5354524b // "STRK"
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// Local is a ShardStore on one directory.
type Local struct {
	fs    vfs.FS
	dir   string
	valve fileio.Valve // raw preads while they are fast

	mu struct {
		sync.Mutex
		open map[ShardID]*openShard
	}
}

type openShard struct {
	f    vfs.File
	n    int64
	crcs []uint32
}

var _ ShardStore = (*Local)(nil)

// OpenLocal opens (creating) a local store in dir.
func OpenLocal(fs vfs.FS, dir string) (*Local, error) {
	if fs == nil {
		fs = vfs.Default
	}
	if err := fs.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("erasure: %w", err)
	}
	l := &Local{fs: fs, dir: dir}
	l.mu.open = make(map[ShardID]*openShard)
	return l, nil
}

func (l *Local) path(id ShardID) string { return filepath.Join(l.dir, id.String()+".shard") }

func mapErr(err error) error {
	if errors.Is(err, syscall.ENOSPC) {
		return fmt.Errorf("%w: %v", ErrNoSpace, err)
	}
	return err
}

func (l *Local) Put(ctx context.Context, id ShardID, data []byte) error {
	n := int64(len(data))
	nb := (n + crcBlock - 1) / crcBlock
	buf := make([]byte, 0, nb*4+footerLen)
	for i := int64(0); i < nb; i++ {
		buf = binary.LittleEndian.AppendUint32(buf, crc32.Checksum(data[i*crcBlock:min(n, (i+1)*crcBlock)], castagnoli))
	}
	tcrc := crc32.Checksum(buf, castagnoli)
	buf = binary.LittleEndian.AppendUint32(buf, footerMagic)
	buf = binary.LittleEndian.AppendUint64(buf, uint64(n))
	buf = binary.LittleEndian.AppendUint32(buf, tcrc)

	tmp := l.path(id) + ".tmp"
	f, err := l.fs.Create(tmp)
	if err != nil {
		return mapErr(fmt.Errorf("erasure: put %v: %w", id, err))
	}
	_, werr := f.Write(data)
	if werr == nil {
		_, werr = f.Write(buf)
	}
	if werr == nil {
		werr = f.Sync()
	}
	cerr := f.Close()
	if err := errors.Join(werr, cerr); err != nil {
		l.fs.Remove(tmp)
		return mapErr(fmt.Errorf("erasure: put %v: %w", id, err))
	}
	if err := l.fs.Rename(tmp, l.path(id)); err != nil {
		return fmt.Errorf("erasure: put %v: %w", id, err)
	}
	return l.syncDir()
}

func (l *Local) syncDir() error {
	d, err := l.fs.OpenDir(l.dir)
	if err != nil {
		return fmt.Errorf("erasure: sync dir: %w", err)
	}
	defer d.Close()
	return d.Sync()
}

func (l *Local) openShardLocked(id ShardID) (*openShard, error) {
	if s, ok := l.mu.open[id]; ok {
		return s, nil
	}
	f, err := l.fs.Open(l.path(id))
	if err != nil {
		if os.IsNotExist(err) {
			return nil, fmt.Errorf("%w: %v", ErrNotFound, id)
		}
		return nil, fmt.Errorf("erasure: open %v: %w", id, err)
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, err
	}
	size := st.Size()
	var foot [footerLen]byte
	if size < footerLen {
		f.Close()
		return nil, fmt.Errorf("%w: shard %v too short", ErrChecksum, id)
	}
	if _, err := f.ReadAt(foot[:], size-footerLen); err != nil {
		f.Close()
		return nil, err
	}
	n := int64(binary.LittleEndian.Uint64(foot[4:]))
	nb := (n + crcBlock - 1) / crcBlock
	if binary.LittleEndian.Uint32(foot[:]) != footerMagic || n+nb*4+footerLen != size {
		f.Close()
		return nil, fmt.Errorf("%w: shard %v: bad footer", ErrChecksum, id)
	}
	table := make([]byte, nb*4)
	if _, err := f.ReadAt(table, n); err != nil {
		f.Close()
		return nil, err
	}
	if crc32.Checksum(table, castagnoli) != binary.LittleEndian.Uint32(foot[12:]) {
		f.Close()
		return nil, fmt.Errorf("%w: shard %v: crc table", ErrChecksum, id)
	}
	s := &openShard{f: f, n: n, crcs: make([]uint32, nb)}
	for i := range s.crcs {
		s.crcs[i] = binary.LittleEndian.Uint32(table[i*4:])
	}
	l.mu.open[id] = s
	return s, nil
}

func (l *Local) ReadAt(ctx context.Context, id ShardID, p []byte, off int64) error {
	l.mu.Lock()
	s, err := l.openShardLocked(id)
	l.mu.Unlock()
	if err != nil {
		return err
	}
	if off < 0 || off+int64(len(p)) > s.n {
		return fmt.Errorf("erasure: read %v [%d,+%d) past its end %d", id, off, len(p), s.n)
	}
	if len(p) == 0 {
		return nil
	}
	// Every checksum block the range touches is read whole and verified:
	// the blocks wholly inside p are read in place, the partial ones at
	// either end through a small buffer.
	end := off + int64(len(p))
	for at := off; at < end; {
		b := at / crcBlock
		blo, bhi := b*crcBlock, min((b+1)*crcBlock, s.n)
		if at == blo && (bhi <= end) {
			// Run of whole blocks: read them straight into p.
			n := (end - at) / crcBlock * crcBlock
			if at+n > s.n || n == 0 {
				n = bhi - at
			}
			dst := p[at-off : at-off+n]
			if err := l.readFull(s, dst, at); err != nil {
				return fmt.Errorf("erasure: read %v: %w", id, err)
			}
			for i := int64(0); i < n; i += crcBlock {
				blk := dst[i:min(n, i+crcBlock)]
				if crc32.Checksum(blk, castagnoli) != s.crcs[(at+i)/crcBlock] {
					return fmt.Errorf("%w: shard %v block %d", ErrChecksum, id, (at+i)/crcBlock)
				}
			}
			at += n
			continue
		}
		var tmp [crcBlock]byte
		blk := tmp[:bhi-blo]
		if err := l.readFull(s, blk, blo); err != nil {
			return fmt.Errorf("erasure: read %v: %w", id, err)
		}
		if crc32.Checksum(blk, castagnoli) != s.crcs[b] {
			return fmt.Errorf("%w: shard %v block %d", ErrChecksum, id, b)
		}
		n := copy(p[at-off:], blk[at-blo:min(bhi, end)-blo])
		at += int64(n)
	}
	return nil
}

func (l *Local) readFull(s *openShard, p []byte, off int64) error {
	n, err := l.valve.ReadAt(s.f, p, off)
	if n == len(p) {
		return nil
	}
	if err == nil || errors.Is(err, io.EOF) {
		err = io.ErrUnexpectedEOF
	}
	return err
}

func (l *Local) Delete(ctx context.Context, id ShardID) error {
	l.mu.Lock()
	if s, ok := l.mu.open[id]; ok {
		s.f.Close()
		delete(l.mu.open, id)
	}
	l.mu.Unlock()
	if err := l.fs.Remove(l.path(id)); err != nil && !os.IsNotExist(err) {
		return fmt.Errorf("erasure: delete %v: %w", id, err)
	}
	return nil
}

func (l *Local) List(ctx context.Context, pkey uint64) ([]ShardID, error) {
	names, err := l.fs.List(l.dir)
	if err != nil {
		return nil, fmt.Errorf("erasure: list: %w", err)
	}
	var out []ShardID
	prefix := fmt.Sprintf("%016x-", pkey)
	for _, n := range names {
		if !strings.HasPrefix(n, prefix) || !strings.HasSuffix(n, ".shard") {
			continue
		}
		var id ShardID
		if _, err := fmt.Sscanf(n, "%016x-%016x.shard", &id.PKey, &id.Seq); err == nil {
			out = append(out, id)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Seq < out[j].Seq })
	return out, nil
}

// Close closes cached file handles.
func (l *Local) Close() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	for id, s := range l.mu.open {
		s.f.Close()
		delete(l.mu.open, id)
	}
	return nil
}
