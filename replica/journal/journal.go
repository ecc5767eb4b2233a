package journal

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"log/slog"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"github.com/cockroachdb/pebble/vfs"

	"stor.dev/stor/erasure/fileio"
)

// Errors the journal returns, alone or wrapped with %w and the facts.
var (
	ErrCorrupt = errors.New("journal: corrupt record")
	ErrOpNum   = errors.New("journal: opnum not increasing")
	ErrClosed  = errors.New("journal: closed")
	ErrRemoved = errors.New("journal: segment removed")
	ErrInvalid = errors.New("journal: invalid record")
	ErrActive  = errors.New("journal: segment is active")
	ErrRange   = errors.New("journal: read outside the segment's records")
	// ErrFailed wraps a write or fsync error that poisoned the journal; only
	// Close and reads still work. Reopen to recover what is on disk.
	ErrFailed = errors.New("journal: failed")
)

// CorruptError is the ErrCorrupt that Open and Replay return, with the facts.
type CorruptError struct {
	Seg    uint64 // segment id
	Off    int64  // file offset of the record
	Reason string
}

func (e *CorruptError) Error() string {
	return fmt.Sprintf("%v: segment %016x offset %d: %s", ErrCorrupt, e.Seg, e.Off, e.Reason)
}

// Unwrap makes errors.Is(err, ErrCorrupt) true.
func (e *CorruptError) Unwrap() error { return ErrCorrupt }

// DefaultSegmentSize is the segment size when Options.SegmentSize is 0.
const DefaultSegmentSize = 64 << 20

// Options configure a Journal. The zero value is usable.
type Options struct {
	// SegmentSize is the size at which the active segment is sealed: the
	// first Append that finds it at or past this size starts a new segment.
	SegmentSize int64
	// Recycle is how many removed segment files the journal keeps for new
	// segments to reuse (see the package doc); 0: 16, negative: none.
	Recycle int
	// Logger receives recovery facts (cut tails). Nil discards.
	Logger *slog.Logger
	// Prezero: while the journal is synced often, keep a zero-filled
	// file in the pool, made in the background, and leave a new (sparse)
	// active segment for it early (see prezeroFile). Off with Recycle < 0.
	Prezero bool
}

// SegmentInfo describes one segment.
type SegmentInfo struct {
	ID              uint64
	Size            int64  // bytes of valid records
	FirstOp, LastOp uint64 // 0, 0 when the segment holds no record
	Records         int64
	Active          bool
}

const (
	lockName    = "LOCK"
	segSuffix   = ".log"
	tmpSuffix   = ".tmp"
	freeSuffix  = ".free" // a removed segment's file, kept for reuse
	scanBufSize = 1 << 20
	keepBufSize = 1 << 20 // Append keeps a buffer up to this size for reuse
)

// segment is one segment file. f is immutable; the file is closed when the
// last reference is released (the journal's table holds one, and every
// reader or syncer in flight one more).
type segment struct {
	id   uint64
	path string
	f    vfs.File
	refs atomic.Int32
	size atomic.Int64 // bytes of valid records; grows only under Journal.mu

	// sparse: created (truncated to size) rather than taken from the pool,
	// so appends allocate its blocks. Set at create, then immutable.
	sparse bool
	// tagged: every record in the file from this use of it carries the
	// segment's tag (version 2), so the file may be reused. Set at open or
	// create, then immutable.
	tagged bool
	// onFree, if set (before the table's reference is released), runs
	// after the file is closed by the last release.
	onFree func()

	// Guarded by Journal.mu.
	firstOp, lastOp uint64
	records         int64
}

func (s *segment) acquire() { s.refs.Add(1) }

func (s *segment) release() error {
	if n := s.refs.Add(-1); n == 0 {
		err := s.f.Close()
		if s.onFree != nil {
			s.onFree()
		}
		return err
	} else if n < 0 {
		panic("journal: segment released too often")
	}
	return nil
}

func (s *segment) info(active bool) SegmentInfo {
	return SegmentInfo{ID: s.id, Size: s.size.Load(), FirstOp: s.firstOp, LastOp: s.lastOp, Records: s.records, Active: active}
}

// Journal is an open journal directory. See the package doc.
type Journal struct {
	fs      vfs.FS
	dir     string
	segSize int64
	recycle int // most files in pool
	log     *slog.Logger
	lock    io.Closer
	dirf    vfs.File     // for fsyncs of the directory
	raw     bool         // small writes may be raw system calls (see writev)
	prezero bool         // Options.Prezero
	rv      fileio.Valve // ReadAt's raw preads while they are fast
	wv      fileio.Valve // writev's raw writes while they are fast

	// Sync calls per one-second window (a hint: racy by design).
	syncs   struct{ start, n, prev atomic.Int64 }
	zeroing atomic.Bool    // the prezero goroutine runs
	zeroID  atomic.Uint64  // names zero-filled files: zeroBase + n
	zeroWG  sync.WaitGroup // the prezero goroutine; Close waits

	closed atomic.Bool
	last   atomic.Uint64 // mirrors mu.last
	synced atomic.Uint64 // mirrors commit.synced
	fail   atomic.Pointer[error]

	mu struct {
		sync.Mutex
		closed   bool
		active   *segment
		segs     []*segment // every live segment by id; active last
		unsynced []*segment // sealed segments not yet fsync'ed, oldest first
		dirDirty bool       // a segment was created since the last directory fsync
		last     uint64     // opnum of the last appended record
		buf      []byte     // record assembly buffer
	}

	// tab maps ids to live segments for readers, so that ReadAt never waits
	// for mu (held across the write call of an Append).
	tab struct {
		sync.RWMutex
		m map[uint64]*segment
	}

	// pool holds removed segment files for reuse. A file enters it only
	// when no reader holds its segment any more.
	pool struct {
		sync.Mutex
		free     []string // paths of files ready for reuse
		reserved int      // files in free or on their way (readers hold them)
		closed   bool     // files arriving now are deleted
	}

	// commit is the group-commit state: one leader at a time runs a round of
	// fsyncs; others wait on done and loop.
	commit struct {
		sync.Mutex
		running bool
		waiters int           // callers waiting for a round to end
		synced  uint64        // every opnum <= synced is durable
		done    chan struct{} // closed when the running round ends
		scratch []*segment    // owned by the running leader
	}
}

func segName(id uint64) string { return fmt.Sprintf("%016x%s", id, segSuffix) }

func parseSegName(name string) (uint64, bool) {
	if len(name) != 16+len(segSuffix) || !strings.HasSuffix(name, segSuffix) {
		return 0, false
	}
	id, err := strconv.ParseUint(name[:16], 16, 64)
	if err != nil || id == 0 || segName(id) != name {
		return 0, false
	}
	return id, true
}

func (j *Journal) path(id uint64) string { return j.fs.PathJoin(j.dir, segName(id)) }

// Open opens the journal in dir, creating it if needed. It reads every
// segment and checks every record; see the package doc for how torn tails
// are cut and what is ErrCorrupt.
func Open(fs vfs.FS, dir string, opts Options) (*Journal, error) {
	j := &Journal{fs: fs, dir: dir, segSize: opts.SegmentSize, recycle: opts.Recycle, log: opts.Logger}
	j.raw = fs == vfs.Default // its files are os.Files: nothing of ours in the write path
	j.prezero = opts.Prezero && opts.Recycle >= 0
	if j.segSize <= 0 {
		j.segSize = DefaultSegmentSize
	}
	if j.recycle == 0 {
		j.recycle = 16
	}
	if j.log == nil {
		j.log = slog.New(slog.DiscardHandler)
	}
	j.log = j.log.With("journal", dir)
	// Make the directory durable: fsync the parent of every directory this
	// creates, and the parent of dir itself (a crashed Open may have made it).
	created := []string{dir}
	for d := fs.PathDir(dir); d != fs.PathDir(d) && len(created) < 64; d = fs.PathDir(d) {
		if _, err := fs.Stat(d); err == nil {
			break
		}
		created = append(created, d)
	}
	if err := fs.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("journal: create %s: %w", dir, err)
	}
	for _, d := range created {
		if err := syncDir(fs, fs.PathDir(d)); err != nil {
			return nil, err
		}
	}
	lock, err := fs.Lock(fs.PathJoin(dir, lockName))
	if err != nil {
		return nil, fmt.Errorf("journal: lock %s: %w", dir, err)
	}
	j.lock = lock
	if err := j.load(); err != nil {
		for _, s := range j.mu.segs {
			if s.f != nil {
				s.f.Close()
			}
		}
		if j.dirf != nil {
			j.dirf.Close()
		}
		lock.Close()
		return nil, err
	}
	j.tab.m = make(map[uint64]*segment, len(j.mu.segs))
	for _, s := range j.mu.segs {
		j.tab.m[s.id] = s
	}
	j.commit.done = make(chan struct{})
	return j, nil
}

func syncDir(fs vfs.FS, dir string) error {
	d, err := fs.OpenDir(dir)
	if err != nil {
		return fmt.Errorf("journal: open dir %s: %w", dir, err)
	}
	err = d.Sync()
	if cerr := d.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("journal: fsync dir %s: %w", dir, err)
	}
	return nil
}

// load scans the directory into j.mu: segments, last opnum, active segment.
func (j *Journal) load() error {
	names, err := j.fs.List(j.dir)
	if err != nil {
		return fmt.Errorf("journal: list %s: %w", j.dir, err)
	}
	if j.dirf, err = j.fs.OpenDir(j.dir); err != nil {
		return fmt.Errorf("journal: open dir %s: %w", j.dir, err)
	}
	var ids []uint64
	removed := false
	for _, name := range names {
		if _, ok := parseSegName(strings.TrimSuffix(name, tmpSuffix)); ok && strings.HasSuffix(name, tmpSuffix) {
			// Left by an interrupted rewrite (see cut); the original is intact.
			if err := j.fs.Remove(j.fs.PathJoin(j.dir, name)); err != nil {
				return fmt.Errorf("journal: remove %s: %w", name, err)
			}
			removed = true
			continue
		}
		if _, ok := parseSegName(strings.TrimSuffix(name, freeSuffix) + segSuffix); ok && strings.HasSuffix(name, freeSuffix) {
			// A removed segment kept for reuse: the pool starts empty.
			if err := j.fs.Remove(j.fs.PathJoin(j.dir, name)); err != nil {
				return fmt.Errorf("journal: remove %s: %w", name, err)
			}
			removed = true
			continue
		}
		if id, ok := parseSegName(name); ok {
			ids = append(ids, id)
		}
	}
	slices.Sort(ids)

	var buf []byte // scan window, shared by the segments
	var prev uint64
	for i, id := range ids {
		s, err := j.openSegment(id, i == len(ids)-1)
		if err != nil {
			return err
		}
		j.mu.segs = append(j.mu.segs, s)
		st, err := s.f.Stat()
		if err != nil {
			return fmt.Errorf("journal: stat %s: %w", s.path, err)
		}
		fileSize := st.Size()
		sc := newScanner(s.f, segTag(id), fileSize, buf)
		off := int64(0)
		bad := ""
		sealed := false
		s.tagged = true
		for off < fileSize {
			var h header
			if _, _, bad, err = sc.next(off, &h); err != nil {
				return fmt.Errorf("journal: read %s at %d: %w", s.path, off, err)
			}
			if bad != "" {
				break
			}
			if h.kind == kindSeal {
				sealed = true
				break
			}
			if h.vers == 1 {
				s.tagged = false
			}
			if h.opnum <= prev {
				return &CorruptError{Seg: id, Off: off, Reason: fmt.Sprintf("opnum %d after %d", h.opnum, prev)}
			}
			prev = h.opnum
			if s.records == 0 {
				s.firstOp = h.opnum
			}
			s.lastOp = h.opnum
			s.records++
			off += HeaderSize + h.payloadLen()
		}
		buf = sc.buf
		newest := i == len(ids)-1
		if sealed && !newest {
			s.size.Store(off + HeaderSize) // complete; the rest is stale
			continue
		}
		if sealed {
			// The newest segment was sealed, and the next one's file is not
			// there: drop the seal and append after its records again.
			bad = "seal of the newest segment"
		}
		s.size.Store(off)
		if off == fileSize {
			if i == len(ids)-1 && off < j.segSize {
				j.presize(s.f) // the active segment, left exact by Close
			}
			continue
		}
		// An invalid record at off. In the newest segment it is a torn tail.
		// In an older one it is a torn tail only if it looks like one (the
		// file ends inside the record, or only zeros follow; in a tagged
		// segment, which ends in a seal record, also when the file holds no
		// seal of this segment past off: the rotation that wrote it came
		// after the last Sync) or if no later segment holds a record. Later
		// segments are then dropped: a Sync fsyncs sealed segments before
		// newer ones, so a record in them was never reported durable while
		// this tail was not. Anything else is corruption of data that may
		// have been acknowledged.
		later := ids[i+1:]
		if len(later) > 0 {
			torn, err := tornLike(sc, off, fileSize)
			if err == nil && !torn && s.tagged && !damagedSeal(sc, off) {
				var found bool
				found, err = hasSeal(sc, off, fileSize)
				torn = !found
			}
			if err != nil {
				return fmt.Errorf("journal: read %s at %d: %w", s.path, off, err)
			}
			for _, lid := range later {
				if torn {
					break
				}
				ok, err := j.startsWithRecord(lid)
				if err != nil {
					return err
				}
				if ok {
					return &CorruptError{Seg: id, Off: off, Reason: fmt.Sprintf("%s, and segment %016x holds records", bad, lid)}
				}
			}
		}
		if newest && (fileSize == j.segSize && zeroHeader(sc, off) || bad == staleRecord || sealed) {
			// The unwritten rest of a presized or reused active segment
			// (or a torn tail that left zeros or an earlier use's records:
			// the same cut serves both).
			j.log.Debug("journal: cutting the unwritten tail of the active segment", "segment", id, "offset", off, "reason", bad)
		} else {
			j.log.Warn("journal: cutting torn tail", "segment", id, "offset", off, "bytes", fileSize-off,
				"reason", bad, "later_segments_dropped", len(later))
		}
		for _, lid := range later {
			if err := j.fs.Remove(j.path(lid)); err != nil {
				return fmt.Errorf("journal: remove %s: %w", j.path(lid), err)
			}
		}
		// The later segments must be gone for good before the cut makes s
		// valid to its end, or a crash in between could revive them.
		if len(later) > 0 {
			if err := j.dirf.Sync(); err != nil {
				return fmt.Errorf("journal: fsync dir %s: %w", j.dir, err)
			}
		}
		if err := j.cut(s, off); err != nil {
			return err
		}
		if len(later) == 0 {
			j.presize(s.f)
		}
		break
	}
	if removed {
		if err := j.dirf.Sync(); err != nil {
			return fmt.Errorf("journal: fsync dir %s: %w", j.dir, err)
		}
	}
	if len(j.mu.segs) == 0 {
		s, err := j.createSegment(1)
		if err != nil {
			return err
		}
		j.mu.segs = append(j.mu.segs, s)
	}
	// What we found may sit in the page cache only (the process crashed, not
	// the machine): make it durable before calling it synced. Clean files
	// cost next to nothing.
	for _, s := range j.mu.segs {
		if err := s.f.Sync(); err != nil {
			return fmt.Errorf("journal: fsync %s: %w", s.path, err)
		}
	}
	j.mu.active = j.mu.segs[len(j.mu.segs)-1]
	j.mu.last = prev
	j.last.Store(prev)
	j.synced.Store(prev)
	j.commit.synced = prev
	return nil
}

// openSegment opens an existing segment, for writing if it is the newest.
func (j *Journal) openSegment(id uint64, writable bool) (*segment, error) {
	s := &segment{id: id, path: j.path(id)}
	var err error
	if writable {
		s.f, err = j.fs.OpenReadWrite(s.path)
	} else {
		s.f, err = j.fs.Open(s.path)
	}
	if err != nil {
		return nil, fmt.Errorf("journal: open %s: %w", s.path, err)
	}
	s.refs.Store(1)
	return s, nil
}

// createSegment creates an empty segment and fsyncs the directory.
func (j *Journal) createSegment(id uint64) (*segment, error) {
	s, err := j.createSegmentNoSync(id)
	if err != nil {
		return nil, err
	}
	if err := j.dirf.Sync(); err != nil {
		s.f.Close()
		return nil, fmt.Errorf("journal: fsync dir %s: %w", j.dir, err)
	}
	return s, nil
}

// createSegmentNoSync creates an empty segment, presized, or from a file
// of the pool; the directory entry is made durable by a later fsync of the
// directory.
func (j *Journal) createSegmentNoSync(id uint64) (*segment, error) {
	s := &segment{id: id, path: j.path(id), tagged: true}
	s.refs.Store(1)
	if free := j.takeFree(); free != "" {
		f, err := j.reuse(free, s.path)
		if err == nil {
			s.f = f
			return s, nil
		}
		j.log.Warn("journal: cannot reuse a removed segment's file", "file", free, "err", err)
		j.fs.Remove(free)
	}
	f, err := j.fs.Create(s.path)
	if err != nil {
		return nil, fmt.Errorf("journal: create %s: %w", s.path, err)
	}
	j.presize(f)
	s.f = f
	s.sparse = true
	j.maybePrezero()
	return s, nil
}

// reuse renames the pool's file free to path and opens it for writing. What
// it holds stays: records with another segment's tag, which Open reads as
// the end of this segment's records. Writing into it overwrites pages the
// page cache may still hold, where appending to a new file makes the kernel
// allocate every page (on the test machine 1 MiB appends ran at 0.6 GB/s
// into new files, one CPU busy in the kernel, and at 11 GB/s over cached
// pages).
func (j *Journal) reuse(free, path string) (vfs.File, error) {
	if err := j.fs.Rename(free, path); err != nil {
		return nil, err
	}
	f, err := j.fs.OpenReadWrite(path)
	if err != nil {
		return nil, err
	}
	j.presize(f)
	return f, nil
}

// takeFree returns a file of the pool (its reservation goes with it), or
// "" if the pool is empty.
func (j *Journal) takeFree() string {
	p := &j.pool
	p.Lock()
	defer p.Unlock()
	n := len(p.free)
	if n == 0 {
		return ""
	}
	free := p.free[n-1]
	p.free = p.free[:n-1]
	p.reserved--
	return free
}

// reserveFree reserves a place in the pool for one more file.
func (j *Journal) reserveFree() bool {
	p := &j.pool
	p.Lock()
	defer p.Unlock()
	if p.closed || p.reserved >= j.recycle {
		return false
	}
	p.reserved++
	return true
}

// putFree adds file path, whose place is reserved, to the pool; when the
// pool is closed, the file is deleted instead.
func (j *Journal) putFree(path string) {
	p := &j.pool
	p.Lock()
	if !p.closed {
		p.free = append(p.free, path)
		p.Unlock()
		return
	}
	p.reserved--
	p.Unlock()
	if err := j.fs.Remove(path); err != nil {
		j.log.Warn("journal: cannot remove a removed segment's file", "file", path, "err", err)
	}
}

// DropRecycled deletes the files the pool holds (an idle journal keeps no
// disk space it does not use), durably. Files still held by readers join
// the pool later.
func (j *Journal) DropRecycled() error {
	p := &j.pool
	p.Lock()
	free := p.free
	p.free = nil
	p.reserved -= len(free)
	p.Unlock()
	return j.removeFiles(free)
}

// removeFiles deletes paths and fsyncs the directory if it deleted any.
func (j *Journal) removeFiles(paths []string) error {
	var errs []error
	for _, path := range paths {
		if err := j.fs.Remove(path); err != nil {
			errs = append(errs, fmt.Errorf("journal: remove %s: %w", path, err))
		}
	}
	if len(paths) > 0 {
		if err := syncDir(j.fs, j.dir); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// presize makes f, the active segment, at least SegmentSize bytes long
// without allocating anything (a sparse file): appends then write inside
// the file instead of extending it, which on ext4 is several times cheaper
// (2 GiB in 1 MiB writes on this project's test machines: 0.8 GB/s
// appending to a new file, 7 GB/s into a sparse one). It never shrinks a
// file: a segment's records may end past SegmentSize (the record that
// crossed it), and a cut there keeps them. Best effort: a file that cannot
// be resized just grows as it is written.
func (j *Journal) presize(f vfs.File) {
	t, ok := f.(truncater)
	if !ok {
		return
	}
	if st, err := f.Stat(); err != nil || st.Size() >= j.segSize {
		return
	}
	if err := t.Truncate(j.segSize); err != nil {
		j.log.Warn("journal: cannot pre-size segment", "err", err)
	}
}

// hasSeal reports whether the bytes [off, size) hold, at any offset, a seal
// record of the segment sc reads (a search, for Open's rare torn-or-corrupt
// question).
func hasSeal(sc *scanner, off, size int64) (bool, error) {
	var m [4]byte
	binary.LittleEndian.PutUint32(m[:], magic)
	for off <= size-HeaderSize {
		n := int(min(size-off, scanBufSize))
		b, err := sc.window(off, n)
		if err != nil {
			return false, err
		}
		for i := 0; i+HeaderSize <= len(b); i++ {
			k := bytes.Index(b[i:len(b)-HeaderSize+4], m[:])
			if k < 0 {
				break
			}
			i += k
			var h header
			hb := b[i : i+HeaderSize]
			if decodeHeader(hb, &h) == "" && h.kind == kindSeal && h.vers == version && h.tag == sc.tag &&
				h.payloadLen() == 0 && crc32.Update(0, castagnoli, hb[:crcOff]) == h.crc {
				return true, nil
			}
		}
		if off+int64(n) >= size {
			break
		}
		off += int64(n) - (HeaderSize - 1) // a header across windows is seen whole in the next
	}
	return false, nil
}

// damagedSeal reports whether the invalid bytes at off are a whole seal
// header of the segment sc reads whose crc fails: damage, not a torn write.
func damagedSeal(sc *scanner, off int64) bool {
	if sc.size-off < HeaderSize {
		return false
	}
	b, err := sc.window(off, HeaderSize)
	var h header
	return err == nil && decodeHeader(b, &h) == "" && h.kind == kindSeal && h.tag == sc.tag
}

// trimTail cuts a presized segment file to the end of its records.
func trimTail(s *segment) error {
	t, ok := s.f.(truncater)
	if !ok {
		return nil
	}
	if err := t.Truncate(s.size.Load()); err != nil {
		return fmt.Errorf("journal: truncate %s to %d: %w", s.path, s.size.Load(), err)
	}
	return nil
}

// startsWithRecord reports whether segment id begins with a valid record.
func (j *Journal) startsWithRecord(id uint64) (bool, error) {
	s, err := j.openSegment(id, false)
	if err != nil {
		return false, err
	}
	defer s.f.Close()
	st, err := s.f.Stat()
	if err != nil {
		return false, fmt.Errorf("journal: stat %s: %w", s.path, err)
	}
	var h header
	_, _, bad, err := newScanner(s.f, segTag(id), st.Size(), nil).next(0, &h)
	if err != nil {
		return false, fmt.Errorf("journal: read %s: %w", s.path, err)
	}
	return bad == "", nil
}

// tornLike reports whether the invalid bytes [off, size) of a segment look
// like a write cut short by a crash rather than damage to written data: too
// short for a header, a header whose record runs past the end of the file,
// or nothing but zeros.
func tornLike(sc *scanner, off, size int64) (bool, error) {
	if size-off < HeaderSize {
		return true, nil
	}
	b, err := sc.window(off, HeaderSize)
	if err != nil {
		return false, err
	}
	var h header
	if decodeHeader(b, &h) == "" && size-off-HeaderSize < h.payloadLen() {
		return true, nil
	}
	for off < size {
		n := int(min(size-off, scanBufSize))
		b, err := sc.window(off, n)
		if err != nil {
			return false, err
		}
		for _, c := range b {
			if c != 0 {
				return false, nil
			}
		}
		off += int64(n)
	}
	return true, nil
}

// zeroHeader reports whether the header-sized bytes at off are all zero.
func zeroHeader(sc *scanner, off int64) bool {
	if sc.size-off < HeaderSize {
		return false
	}
	b, err := sc.window(off, HeaderSize)
	if err != nil {
		return false
	}
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// truncater is implemented by files that can shrink (os.File).
type truncater interface{ Truncate(size int64) error }

// cut makes s end at off, durably, and reopens it for writing.
func (j *Journal) cut(s *segment, off int64) error {
	if err := s.f.Close(); err != nil {
		return fmt.Errorf("journal: close %s: %w", s.path, err)
	}
	s.f = nil
	f, err := j.fs.OpenReadWrite(s.path)
	if err != nil {
		return fmt.Errorf("journal: open %s: %w", s.path, err)
	}
	if t, ok := f.(truncater); ok {
		if err := t.Truncate(off); err != nil {
			f.Close()
			return fmt.Errorf("journal: truncate %s to %d: %w", s.path, off, err)
		}
		if err := f.Sync(); err != nil {
			f.Close()
			return fmt.Errorf("journal: fsync %s: %w", s.path, err)
		}
		s.f = f
		return nil
	}
	// No truncate in this FS: copy the valid prefix to a temporary file and
	// rename it over the segment. A crash leaves either file whole.
	err = j.rewritePrefix(f, s.path, off)
	f.Close()
	if err != nil {
		return err
	}
	if s.f, err = j.fs.OpenReadWrite(s.path); err != nil {
		return fmt.Errorf("journal: open %s: %w", s.path, err)
	}
	return nil
}

func (j *Journal) rewritePrefix(src vfs.File, path string, n int64) error {
	tmp := path + tmpSuffix
	dst, err := j.fs.Create(tmp)
	if err != nil {
		return fmt.Errorf("journal: create %s: %w", tmp, err)
	}
	_, err = io.Copy(dst, io.NewSectionReader(src, 0, n))
	if err == nil {
		err = dst.Sync()
	}
	if cerr := dst.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = j.fs.Rename(tmp, path)
	}
	if err == nil {
		err = j.dirf.Sync()
	}
	if err != nil {
		return fmt.Errorf("journal: rewrite %s to %d bytes: %w", path, n, err)
	}
	return nil
}

// failed returns the error that poisoned the journal, or nil.
func (j *Journal) failed() error {
	if p := j.fail.Load(); p != nil {
		return *p
	}
	return nil
}

// poison records err as fatal (the first one wins) and returns the fatal error.
func (j *Journal) poison(err error) error {
	if j.fail.CompareAndSwap(nil, &err) {
		j.log.Error("journal: failed; appends and syncs refused until reopened", "err", err)
	}
	return j.failed()
}

// Append writes r as the next record of the journal (one write call for a
// record up to 1 MiB, header then payload in place for larger ones), and returns the position of its data. It does not fsync (see Sync).
// r.OpNum must exceed every opnum appended before, and 0 (ErrOpNum); r is
// checked against the format rules (ErrInvalid). The journal does not keep
// r. A failed Append appends nothing; see the package doc for ErrFailed.
func (j *Journal) Append(r *Record) (Pos, error) {
	if err := checkRecord(r); err != nil {
		return Pos{}, err
	}
	j.mu.Lock()
	defer j.mu.Unlock()
	if err := j.appendableLocked(r); err != nil {
		return Pos{}, err
	}
	return j.appendLocked(r)
}

// AppendBatch appends rs in order, as Append would one at a time, and
// returns their positions appended to pos. Records that follow each other
// in one segment go out in one write call, up to keepBufSize bytes a call.
// On an error, the records before the one that failed are appended (pos
// has theirs) and none after; the error is Append's.
func (j *Journal) AppendBatch(rs []*Record, pos []Pos) ([]Pos, error) {
	for _, r := range rs {
		if err := checkRecord(r); err != nil {
			return pos, err
		}
	}
	j.mu.Lock()
	defer j.mu.Unlock()
	for i := 0; i < len(rs); {
		r := rs[i]
		if err := j.appendableLocked(r); err != nil {
			return pos, err
		}
		s, err := j.segmentForAppendLocked()
		if err != nil {
			return pos, err
		}
		// The run rs[i:k]: records that start inside this segment, in
		// opnum order, whose bytes fit one buffer.
		off := s.size.Load()
		end, k := off, i
		for k < len(rs) && (k == i || end < j.segSize && rs[k].OpNum > rs[k-1].OpNum) {
			n := int64(HeaderSize + len(rs[k].Data) + len(rs[k].Aux))
			if end+n-off > keepBufSize {
				break
			}
			end += n
			k++
		}
		if k <= i+1 {
			p, err := j.appendLocked(r)
			if err != nil {
				return pos, err
			}
			pos = append(pos, p)
			i++
			continue
		}
		b := j.mu.buf
		if int64(cap(b)) < end-off {
			b = make([]byte, end-off)
			j.mu.buf = b
		}
		b = b[:end-off]
		at := int64(0)
		for _, r := range rs[i:k] {
			encodeRecord(b[at:], r, segTag(s.id))
			at += int64(HeaderSize + len(r.Data) + len(r.Aux))
		}
		if err := j.writev(s, off, b); err != nil {
			return pos, j.failedWriteLocked(s, off, err)
		}
		if invariants {
			j.checkAppendLocked(s, end)
		}
		at = off
		for _, r := range rs[i:k] {
			pos = append(pos, j.appendedLocked(s, r, at))
			at += int64(HeaderSize + len(r.Data) + len(r.Aux))
		}
		i = k
	}
	return pos, nil
}

// appendableLocked checks that r may be the journal's next record.
// REQUIRES: j.mu
func (j *Journal) appendableLocked(r *Record) error {
	if j.mu.closed {
		return ErrClosed
	}
	if err := j.failed(); err != nil {
		return err
	}
	if r.OpNum <= j.mu.last {
		return fmt.Errorf("%w: opnum %d after %d", ErrOpNum, r.OpNum, j.mu.last)
	}
	return nil
}

// segmentForAppendLocked returns the active segment, rotating first if it
// is full: a record starts in a segment only below SegmentSize (it may end
// past it).
// REQUIRES: j.mu
func (j *Journal) segmentForAppendLocked() (*segment, error) {
	a := j.mu.active
	if off := a.size.Load(); off > 0 && (off >= j.segSize || a.sparse && j.prezero && j.syncHeavy() && j.poolReady()) {
		if _, err := j.rotateLocked(); err != nil {
			return nil, err
		}
	}
	return j.mu.active, nil
}

// appendLocked writes r, checked, as the next record.
// REQUIRES: j.mu
func (j *Journal) appendLocked(r *Record) (Pos, error) {
	s, err := j.segmentForAppendLocked()
	if err != nil {
		return Pos{}, err
	}
	n := HeaderSize + len(r.Data) + len(r.Aux)
	off := s.size.Load()
	var werr error
	if n <= keepBufSize {
		// One write of the assembled record.
		b := j.mu.buf
		if cap(b) < n {
			b = make([]byte, n)
			j.mu.buf = b
		}
		b = b[:n]
		encodeRecord(b, r, segTag(s.id))
		werr = j.writev(s, off, b)
	} else {
		// A large record is written in place, piece by piece, rather than
		// copied: the crc still tells a torn record from a whole one.
		var h [HeaderSize]byte
		encodeHeader(h[:], r, segTag(s.id))
		werr = j.writev(s, off, h[:], r.Data, r.Aux)
	}
	if werr != nil {
		return Pos{}, j.failedWriteLocked(s, off, werr)
	}
	if invariants {
		j.checkAppendLocked(s, off+int64(n))
	}
	return j.appendedLocked(s, r, off), nil
}

// failedWriteLocked handles a failed write of records at off of s: out of
// space, say. It cuts whatever part landed, so that the next Append
// follows valid data; if that fails, it gives up (ErrFailed).
// REQUIRES: j.mu
func (j *Journal) failedWriteLocked(s *segment, off int64, werr error) error {
	err := fmt.Errorf("journal: write %s at %d: %w", s.path, off, werr)
	if t, ok := s.f.(truncater); !ok || t.Truncate(off) != nil {
		err = j.poison(fmt.Errorf("%w: %w", ErrFailed, err))
	}
	return err
}

// appendedLocked records that r was written at off of s, the active
// segment, and returns the position of its data.
// REQUIRES: j.mu
func (j *Journal) appendedLocked(s *segment, r *Record, off int64) Pos {
	if s.records == 0 {
		s.firstOp = r.OpNum
	}
	s.lastOp = r.OpNum
	s.records++
	s.size.Store(off + int64(HeaderSize+len(r.Data)+len(r.Aux)))
	j.mu.last = r.OpNum
	j.last.Store(r.OpNum)
	return Pos{Seg: s.id, Off: off + HeaderSize}
}

// checkAppendLocked panics unless the file holds the record it just wrote
// (a presized or reused file is longer), and the segments are in order.
// REQUIRES: j.mu
func (j *Journal) checkAppendLocked(s *segment, end int64) {
	if st, err := s.f.Stat(); err == nil && st.Size() < end {
		panic(fmt.Sprintf("journal: %s is %d bytes after a record ending at %d", s.path, st.Size(), end))
	}
	for i, t := range j.mu.segs {
		if i > 0 && t.id <= j.mu.segs[i-1].id || t.refs.Load() < 1 {
			panic(fmt.Sprintf("journal: segment table out of order or released: %d", t.id))
		}
	}
	if j.mu.active != j.mu.segs[len(j.mu.segs)-1] || j.mu.active != s {
		panic("journal: active segment is not the newest")
	}
}

// Rotate seals the active segment, if it holds any record, and starts a new
// one. It returns the id of the sealed segment, or 0 if the active segment
// was empty and nothing changed. The sealed segment's tail is fsync'ed by
// the next Sync.
func (j *Journal) Rotate() (sealed uint64, err error) {
	j.mu.Lock()
	defer j.mu.Unlock()
	if j.mu.closed {
		return 0, ErrClosed
	}
	if err := j.failed(); err != nil {
		return 0, err
	}
	if j.mu.active.size.Load() == 0 {
		return 0, nil
	}
	return j.rotateLocked()
}

// rotateLocked seals the active segment and creates the next.
// REQUIRES: j.mu
func (j *Journal) rotateLocked() (uint64, error) {
	old := j.mu.active
	// A sealed segment ends in a seal record (the next Sync makes it
	// durable, before anything in the new segment); what follows it in
	// the file is not the segment's.
	var seal [HeaderSize]byte
	encodeHeader(seal[:], &Record{Kind: kindSeal}, segTag(old.id))
	end := old.size.Load()
	if _, err := old.f.WriteAt(seal[:], end); err != nil {
		return 0, j.poison(fmt.Errorf("%w: journal: seal %s: %w", ErrFailed, old.path, err))
	}
	old.size.Store(end + HeaderSize)
	// No directory fsync here, under the lock of every Append: the next
	// Sync round does it before it reports anything in the new segment
	// durable (see syncRound).
	s, err := j.createSegmentNoSync(old.id + 1)
	if err != nil {
		return 0, err
	}
	j.mu.dirDirty = true
	j.tab.Lock()
	j.tab.m[s.id] = s
	j.tab.Unlock()
	j.mu.unsynced = append(j.mu.unsynced, old)
	j.mu.segs = append(j.mu.segs, s)
	j.mu.active = s
	return old.id, nil
}

// LastOpNum is the opnum of the last appended record (0 if none).
func (j *Journal) LastOpNum() uint64 { return j.last.Load() }

// SyncedOpNum is the highest opnum known durable: every record up to it
// survives power loss.
func (j *Journal) SyncedOpNum() uint64 { return j.synced.Load() }

// acquire returns segment id with a reference, or nil if it is not live.
func (j *Journal) acquire(id uint64) *segment {
	j.tab.RLock()
	s := j.tab.m[id]
	if s != nil {
		s.acquire()
	}
	j.tab.RUnlock()
	return s
}

// ReadAt fills p with the journal bytes at pos: a record's data, or a part
// of it at Pos{Seg, Off + k}. It reads with one pread, does not check the
// crc, and never waits for an Append. A removed segment is ErrRemoved; a
// range beyond the segment's records is ErrRange.
func (j *Journal) ReadAt(p []byte, pos Pos) error {
	s := j.acquire(pos.Seg)
	if s == nil {
		if j.closed.Load() {
			return ErrClosed
		}
		return fmt.Errorf("%w: segment %016x", ErrRemoved, pos.Seg)
	}
	defer s.release()
	if pos.Off < HeaderSize || pos.Off > s.size.Load()-int64(len(p)) {
		return fmt.Errorf("%w: segment %016x offset %d length %d", ErrRange, pos.Seg, pos.Off, len(p))
	}
	fd := fileio.InvalidFd
	if j.raw {
		fd = s.f.Fd() // open while we hold s
	}
	if n, err := j.rv.ReadAtFd(s.f, fd, p, pos.Off); n != len(p) {
		if err == nil || errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return fmt.Errorf("journal: read %s at %d: %w", s.path, pos.Off, err)
	}
	return nil
}

// Replay calls fn for every record with OpNum > after, in order, with the
// position of its data. r and its Data and Aux are valid only during fn.
// Records appended after Replay starts are not visited. fn may call other
// methods of the journal. An error from fn stops Replay and is returned.
func (j *Journal) Replay(after uint64, fn func(r *Record, pos Pos) error) error {
	type item struct {
		s    *segment
		size int64
	}
	j.mu.Lock()
	if j.mu.closed {
		j.mu.Unlock()
		return ErrClosed
	}
	var items []item
	for _, s := range j.mu.segs {
		if s.records > 0 && s.lastOp > after {
			s.acquire()
			items = append(items, item{s, s.size.Load()})
		}
	}
	j.mu.Unlock()
	defer func() {
		for _, it := range items {
			it.s.release()
		}
	}()
	var buf []byte
	var r Record
	for _, it := range items {
		sc := newScanner(it.s.f, segTag(it.s.id), it.size, buf)
		for off := int64(0); off < it.size; {
			var h header
			data, aux, bad, err := sc.next(off, &h)
			if err != nil {
				return fmt.Errorf("journal: replay %s at %d: %w", it.s.path, off, err)
			}
			if bad != "" {
				return &CorruptError{Seg: it.s.id, Off: off, Reason: bad}
			}
			if h.kind == kindSeal {
				break
			}
			if h.opnum > after {
				r = Record{Kind: h.kind, Flags: h.flags, Epoch: h.epoch, OpNum: h.opnum,
					Off: int64(h.off), Len: int64(h.length), Data: data, Aux: aux}
				if len(r.Data) == 0 {
					r.Data = nil
				}
				if len(r.Aux) == 0 {
					r.Aux = nil
				}
				if err := fn(&r, Pos{Seg: it.s.id, Off: off + HeaderSize}); err != nil {
					return err
				}
			}
			off += HeaderSize + h.payloadLen()
		}
		buf = sc.buf
	}
	return nil
}

// Segments describes the live segments in id order; the last is active.
func (j *Journal) Segments() []SegmentInfo {
	j.mu.Lock()
	defer j.mu.Unlock()
	out := make([]SegmentInfo, len(j.mu.segs))
	for i, s := range j.mu.segs {
		out[i] = s.info(s == j.mu.active)
	}
	return out
}

// Remove deletes sealed segment seg and fsyncs the directory. The active
// segment is refused (ErrActive); an unknown or removed one is ErrRemoved.
// Readers holding the segment finish their reads; later reads of it return
// ErrRemoved. The file may be kept, renamed, for a new segment to reuse
// once the last reader is done with it (Options.Recycle).
func (j *Journal) Remove(seg uint64) error {
	j.mu.Lock()
	if j.mu.closed {
		j.mu.Unlock()
		return ErrClosed
	}
	i := slices.IndexFunc(j.mu.segs, func(s *segment) bool { return s.id == seg })
	if i < 0 {
		j.mu.Unlock()
		return fmt.Errorf("%w: segment %016x", ErrRemoved, seg)
	}
	s := j.mu.segs[i]
	if s == j.mu.active {
		j.mu.Unlock()
		return fmt.Errorf("%w: cannot remove segment %016x", ErrActive, seg)
	}
	j.unlinkLocked(i)
	j.mu.Unlock()
	if s.tagged && j.reserveFree() {
		return j.recycleFile(s)
	}
	return j.deleteFile(s)
}

// recycleFile renames an unlinked segment's file out of the segment names,
// durably (directory fsync), and drops the table's reference; the file
// joins the pool when the last reader is done with it. Its place in the
// pool is reserved.
func (j *Journal) recycleFile(s *segment) error {
	free := j.fs.PathJoin(j.dir, fmt.Sprintf("%016x%s", s.id, freeSuffix))
	err := j.fs.Rename(s.path, free)
	if err != nil {
		err = fmt.Errorf("journal: rename %s: %w", s.path, err)
		j.pool.Lock()
		j.pool.reserved--
		j.pool.Unlock()
	} else if err = j.dirf.Sync(); err != nil {
		err = fmt.Errorf("journal: fsync dir %s: %w", j.dir, err)
	}
	if err == nil {
		s.onFree = func() { j.putFree(free) }
	}
	s.release()
	return err
}

// unlinkLocked takes j.mu.segs[i] out of the segment tables: no new reader
// finds it.
// REQUIRES: j.mu
func (j *Journal) unlinkLocked(i int) {
	s := j.mu.segs[i]
	j.mu.segs = slices.Delete(j.mu.segs, i, i+1)
	j.mu.unsynced = slices.DeleteFunc(j.mu.unsynced, func(u *segment) bool { return u == s })
	j.tab.Lock()
	delete(j.tab.m, s.id)
	j.tab.Unlock()
}

// deleteFile removes an unlinked segment's file durably (directory fsync)
// and drops the table's reference; readers holding it finish first.
func (j *Journal) deleteFile(s *segment) error {
	err := j.fs.Remove(s.path)
	if err != nil {
		err = fmt.Errorf("journal: remove %s: %w", s.path, err)
	} else if err = j.dirf.Sync(); err != nil {
		err = fmt.Errorf("journal: fsync dir %s: %w", j.dir, err)
	}
	s.release()
	return err
}

// Close fsyncs what was appended, closes every file and releases the lock.
// Later calls return ErrClosed; reads in flight finish first.
func (j *Journal) Close() error {
	j.mu.Lock()
	if j.mu.closed {
		j.mu.Unlock()
		return ErrClosed
	}
	j.mu.closed = true
	j.closed.Store(true)
	last := j.mu.last
	j.mu.Unlock()

	var errs []error
	if err := j.syncTo(nil, last); err != nil {
		errs = append(errs, err)
	}
	j.mu.Lock()
	if a := j.mu.active; a != nil && j.failed() == nil {
		// Leave exact files behind (not synced: Open cuts a presized tail
		// anyway).
		if err := trimTail(a); err != nil {
			errs = append(errs, err)
		}
	}
	segs := j.mu.segs
	j.mu.segs, j.mu.unsynced, j.mu.active = nil, nil, nil
	j.mu.Unlock()
	j.pool.Lock()
	j.pool.closed = true
	j.pool.Unlock()
	j.zeroWG.Wait() // it sees pool.closed, stops, and deletes its file
	j.pool.Lock()
	free := j.pool.free
	j.pool.free = nil
	j.pool.reserved -= len(free)
	j.pool.Unlock()
	if err := j.removeFiles(free); err != nil {
		errs = append(errs, err)
	}
	j.tab.Lock()
	j.tab.m = nil
	j.tab.Unlock()
	for _, s := range segs {
		if err := s.release(); err != nil {
			errs = append(errs, fmt.Errorf("journal: close %s: %w", s.path, err))
		}
	}
	if err := j.dirf.Close(); err != nil {
		errs = append(errs, fmt.Errorf("journal: close dir %s: %w", j.dir, err))
	}
	if err := j.lock.Close(); err != nil {
		errs = append(errs, fmt.Errorf("journal: unlock %s: %w", j.dir, err))
	}
	return errors.Join(errs...)
}

// rawMax is the largest raw write (writev).
const rawMax = 2 << 20

// writev writes the concatenation of bs at off in s's file.
//
// On vfs.Default, a write of up to rawMax bytes is a raw pwritev(2)
// (syscall.RawSyscall6) rather than an ordinary system call: an ordinary
// one made while the process is idle wakes the Go runtime's sysmon thread
// (two or more context switches and tens of microseconds of CPU per op at
// queue depth 1 on a VM; package target/sockio does the same for
// sockets), and one that lasts over 20 µs (a 1 MiB write into the page
// cache takes ~0.6 ms here) makes sysmon hand the P to another thread and
// keep polling every 20 µs. A raw call keeps its P for its whole duration;
// a page-cache write normally takes microseconds to a millisecond, but the
// kernel may throttle it (dirty-page limits, reclaim) for up to hundreds
// of milliseconds, and meanwhile the P runs nothing else and a GC
// stop-the-world waits for it. So the first raw write that takes longer
// than it should switches the journal to ordinary calls for a while
// (j.wv: fileio's thresholds; 1 MiB into pages the page cache does not
// hold yet takes up to ~2.3 ms here).
// REQUIRES: j.mu.
func (j *Journal) writev(s *segment, off int64, bs ...[]byte) error {
	var iov [3]syscall.Iovec
	n, total, fits := 0, 0, true
	for _, b := range bs {
		switch {
		case len(b) == 0:
		case n == len(iov):
			fits = false
		default:
			iov[n].Base = &b[0]
			iov[n].SetLen(len(b))
			n++
		}
		total += len(b)
	}
	fd := vfs.InvalidFd
	if j.raw && fits && total <= rawMax && j.wv.On() {
		fd = s.f.Fd()
	}
	if fd == vfs.InvalidFd || total == 0 {
		for _, b := range bs {
			if _, err := s.f.WriteAt(b, off); err != nil {
				return err
			}
			off += int64(len(b))
		}
		return nil
	}
	start := time.Now()
	vs := iov[:n]
	for len(vs) > 0 {
		k, _, e := syscall.RawSyscall6(syscall.SYS_PWRITEV, fd, uintptr(unsafe.Pointer(&vs[0])), uintptr(len(vs)),
			uintptr(off), 0, 0) // pos_l, pos_h (64-bit: pos_l is the offset)
		switch {
		case e == syscall.EINTR:
			continue
		case e != 0:
			return &os.PathError{Op: "pwritev", Path: s.path, Err: e}
		case k == 0:
			return &os.PathError{Op: "pwritev", Path: s.path, Err: io.ErrShortWrite}
		}
		off += int64(k)
		for k > 0 { // drop what was written
			if l := uintptr(vs[0].Len); k >= l {
				k -= l
				vs = vs[1:]
			} else {
				vs[0].Base = (*byte)(unsafe.Add(unsafe.Pointer(vs[0].Base), k))
				vs[0].Len -= uint64(k)
				k = 0
			}
		}
	}
	if j.wv.Timed(start, total); !j.wv.On() {
		j.log.Debug("journal: slow page-cache write; ordinary system calls for a while", "took", time.Since(start))
	}
	return nil
}

// Zero-filled files (Options.Prezero). An fdatasync after appends into a
// new segment (sparse: truncated to size) must also commit the file
// system's allocation of the blocks written; into blocks already written
// it is a data write and a cache flush. On the test VM (ext4 on virtio),
// 4 KiB writes each followed by an NBD FLUSH ran at 1.3-1.4k/s (fsync p50
// 540-600 µs) into new segments and at 1.9k/s (360 µs) into zero-filled
// ones. Recycled files are written already; zero-filled ones stand in
// when the pool runs dry, but only while syncs are frequent: a journal
// that grows under large writes would pay a second write of every new
// segment for nothing.
const (
	zeroBase   = 0xfffe_0000_0000_0000 // ids of zero-filled files, above any segment's
	zeroChunk  = 1 << 20
	heavySyncs = 20 // Sync calls in a second that make the journal "synced often"
)

// noteSync counts a Sync call in the current one-second window.
func (j *Journal) noteSync() {
	now := time.Now().UnixNano()
	w := &j.syncs
	if start := w.start.Load(); now-start > int64(time.Second) && w.start.CompareAndSwap(start, now) {
		n := w.n.Swap(0)
		if now-start > 2*int64(time.Second) {
			n = 0
		}
		w.prev.Store(n)
	}
	w.n.Add(1)
}

// syncHeavy reports whether the current or the previous second saw
// heavySyncs Sync calls.
func (j *Journal) syncHeavy() bool {
	w := &j.syncs
	if time.Now().UnixNano()-w.start.Load() > 2*int64(time.Second) {
		return false
	}
	return w.n.Load() >= heavySyncs || w.prev.Load() >= heavySyncs
}

// poolReady reports whether the pool holds a file.
func (j *Journal) poolReady() bool {
	j.pool.Lock()
	defer j.pool.Unlock()
	return len(j.pool.free) > 0
}

// maybePrezero starts the prezero goroutine if the journal is synced
// often, the pool is empty and none runs.
func (j *Journal) maybePrezero() {
	if !j.prezero || !j.syncHeavy() || j.poolReady() || !j.zeroing.CompareAndSwap(false, true) {
		return
	}
	j.pool.Lock()
	closed := j.pool.closed
	if !closed {
		j.zeroWG.Add(1) // under pool's lock: Close sets closed, then waits
	}
	j.pool.Unlock()
	if closed {
		j.zeroing.Store(false)
		return
	}
	go func() {
		defer j.zeroWG.Done()
		defer j.zeroing.Store(false)
		if err := j.prezeroFile(); err != nil {
			j.log.Warn("journal: cannot make a zero-filled segment file", "err", err)
		}
	}()
}

// prezeroFile writes a segment-sized file of zeros (as a .tmp file, which
// Open deletes), fsyncs it and puts it in the pool, whose Open deletes
// too. It gives up, deleting the file, when the pool closes.
func (j *Journal) prezeroFile() error {
	if !j.reserveFree() {
		return nil
	}
	id := zeroBase + j.zeroID.Add(1)
	tmp := j.path(id) + tmpSuffix
	free := j.fs.PathJoin(j.dir, fmt.Sprintf("%016x%s", id, freeSuffix))
	inPool := false
	defer func() {
		if !inPool {
			j.pool.Lock()
			j.pool.reserved--
			j.pool.Unlock()
			j.fs.Remove(tmp)
		}
	}()
	f, err := j.fs.Create(tmp)
	if err != nil {
		return err
	}
	zeros := make([]byte, zeroChunk)
	for off := int64(0); off < j.segSize; off += zeroChunk {
		if j.poolClosed() {
			f.Close()
			return nil
		}
		if _, err := f.WriteAt(zeros[:min(zeroChunk, j.segSize-off)], off); err != nil {
			f.Close()
			return err
		}
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if err := j.fs.Rename(tmp, free); err != nil {
		return err
	}
	if err := j.dirf.Sync(); err != nil {
		j.fs.Remove(free)
		return err
	}
	inPool = true
	j.putFree(free)
	return nil
}

func (j *Journal) poolClosed() bool {
	j.pool.Lock()
	defer j.pool.Unlock()
	return j.pool.closed
}
