package control

import (
	"bytes"
	"context"
	"log/slog"
	"strings"
	"sync"
)

// raftLogWriter turns hashicorp/raft's log lines ("... [WARN]  raft: msg:
// k=v") into slog records at the matching level.
type raftLogWriter struct {
	log *slog.Logger
	mu  struct {
		sync.Mutex
		buf []byte
	}
}

func (w *raftLogWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.mu.buf = append(w.mu.buf, p...)
	for {
		i := bytes.IndexByte(w.mu.buf, '\n')
		if i < 0 {
			break
		}
		w.emitLocked(string(w.mu.buf[:i]))
		w.mu.buf = w.mu.buf[i+1:]
	}
	return len(p), nil
}

// emitLocked logs one line.
// REQUIRES: w.mu
func (w *raftLogWriter) emitLocked(line string) {
	level := slog.LevelInfo
	for _, l := range []struct {
		tag   string
		level slog.Level
	}{{"[TRACE]", slog.LevelDebug - 4}, {"[DEBUG]", slog.LevelDebug}, {"[INFO]", slog.LevelInfo}, {"[WARN]", slog.LevelWarn}, {"[ERROR]", slog.LevelError}} {
		if i := strings.Index(line, l.tag); i >= 0 {
			level = l.level
			line = strings.TrimSpace(line[i+len(l.tag):])
			break
		}
	}
	w.log.Log(context.Background(), level, line)
}
