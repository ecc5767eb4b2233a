package journal

import (
	"context"
	"fmt"
	"slices"
)

// Sync returns once every record whose Append returned before Sync was
// called is durable, and with it the tails of segments sealed since the last
// Sync. Concurrent callers share rounds of fsyncs: one round is in flight at
// a time, and callers that arrive during it are covered together by the next
// round. A caller whose ctx ends stops waiting and returns ctx.Err() (the
// round in flight goes on); an ended ctx never starts a round; the caller
// running a round finishes it regardless of ctx. An fsync error poisons the
// journal (ErrFailed).
func (j *Journal) Sync(ctx context.Context) error {
	if j.closed.Load() {
		return ErrClosed
	}
	if j.prezero {
		j.noteSync()
		j.maybePrezero()
	}
	return j.syncTo(ctx, j.last.Load())
}

// syncTo waits until opnum target is durable, leading rounds of fsyncs as
// needed. A nil ctx never ends.
func (j *Journal) syncTo(ctx context.Context, target uint64) error {
	var ctxDone <-chan struct{}
	if ctx != nil {
		ctxDone = ctx.Done()
	}
	c := &j.commit
	c.Lock()
	for {
		if err := j.failed(); err != nil {
			c.Unlock()
			return err
		}
		if l := j.last.Load(); target > l {
			// TruncateFrom cut the records past l: nothing more to wait for.
			target = l
		}
		if c.synced >= target {
			c.Unlock()
			return nil
		}
		if !c.running {
			if ctx != nil && ctx.Err() != nil {
				c.Unlock()
				return ctx.Err()
			}
			c.running = true
			c.Unlock()
			op, err := j.syncRound()
			c.Lock()
			c.running = false
			if err != nil {
				j.poison(err)
			} else if op > c.synced {
				c.synced = op
				j.synced.Store(op)
			}
			if c.waiters > 0 {
				// Only waiters hold done; with none, keep it (no allocation
				// per round for a lone syncer).
				close(c.done)
				c.done = make(chan struct{})
			}
			continue
		}
		done := c.done
		c.waiters++
		c.Unlock()
		select {
		case <-done:
		case <-ctxDone:
			c.Lock()
			c.waiters--
			c.Unlock()
			return ctx.Err()
		}
		c.Lock()
		c.waiters--
	}
}

// syncRound fsyncs every sealed-but-unsynced segment, oldest first, then the
// active one, and returns the opnum it made durable.
// REQUIRES: j.commit.running was set by the caller (owns j.commit.scratch).
func (j *Journal) syncRound() (uint64, error) {
	j.mu.Lock()
	if j.mu.active == nil {
		j.mu.Unlock()
		return 0, ErrClosed
	}
	op := j.mu.last
	dirDirty := j.mu.dirDirty
	j.mu.dirDirty = false
	segs := append(j.commit.scratch[:0], j.mu.unsynced...)
	sealed := len(segs)
	segs = append(segs, j.mu.active)
	for _, s := range segs {
		s.acquire()
	}
	j.mu.Unlock()

	var err error
	for _, s := range segs {
		if err = s.f.SyncData(); err != nil {
			err = fmt.Errorf("%w: fsync %s: %w", ErrFailed, s.path, err)
			break
		}
	}
	if err == nil && dirDirty {
		// Segments created since the last round: their directory entries.
		if err = j.dirf.Sync(); err != nil {
			err = fmt.Errorf("%w: fsync dir %s: %w", ErrFailed, j.dir, err)
		}
	}
	if err == nil && sealed > 0 {
		// Sealed before the round began, so no write followed their fsync.
		// The active one may have been sealed since: it stays unsynced.
		j.mu.Lock()
		j.mu.unsynced = slices.DeleteFunc(j.mu.unsynced, func(s *segment) bool {
			return slices.Contains(segs[:sealed], s)
		})
		j.mu.Unlock()
	}
	for i, s := range segs {
		s.release()
		segs[i] = nil
	}
	j.commit.scratch = segs[:0]
	return op, err
}
