package ws

import (
	"fmt"
	"strings"
	"sync"
	"time"
)

// uploads reassembles one connection's chunked vision images with bounded
// memory: a cap on the base64 bytes held across all uploads, on the chunks
// of one upload and on uploads in progress, and a timeout that drops an
// upload whose chunks stop coming.
type uploads struct {
	maxBytes   int64
	maxChunks  int
	maxPending int
	timeout    time.Duration
	onExpire   func(imageID string)

	mu    sync.Mutex
	bytes int64
	ups   map[string]*upload
}

type upload struct {
	parts []string
	have  int
	size  int64
	timer *time.Timer
	// deadline guards against a timer that fired while add held the lock
	deadline time.Time
}

func newUploads(cfg *config, onExpire func(string)) *uploads {
	return &uploads{
		maxBytes:   cfg.maxVisionBytes,
		maxChunks:  cfg.maxVisionChunks,
		maxPending: cfg.maxUploads,
		timeout:    cfg.visionTimeout,
		onExpire:   onExpire,
		ups:        map[string]*upload{},
	}
}

const maxImageID = 128

// add stores one chunk. It returns the whole base64 image once every chunk
// is in. Any error drops the upload, so a client can start over.
func (u *uploads) add(id string, idx, total int, data string) (string, bool, error) {
	if id == "" || len(id) > maxImageID {
		return "", false, fmt.Errorf("image_id must be 1-%d characters", maxImageID)
	}
	u.mu.Lock()
	defer u.mu.Unlock()
	up, ok := u.ups[id]
	if !ok {
		if total < 1 || total > u.maxChunks {
			return "", false, fmt.Errorf("total_chunks %d out of range [1, %d]", total, u.maxChunks)
		}
		if len(u.ups) >= u.maxPending {
			return "", false, fmt.Errorf("too many vision uploads in progress (limit %d)", u.maxPending)
		}
		up = &upload{parts: make([]string, total)}
		up.timer = time.AfterFunc(u.timeout, func() { u.expire(id, up) })
		u.ups[id] = up
	}
	if total != len(up.parts) {
		u.dropLocked(id, up)
		return "", false, fmt.Errorf("total_chunks changed from %d to %d in upload %q", len(up.parts), total, id)
	}
	if idx < 0 || idx >= total {
		u.dropLocked(id, up)
		return "", false, fmt.Errorf("chunk_id %d out of range [0, %d)", idx, total)
	}
	if data == "" {
		u.dropLocked(id, up)
		return "", false, fmt.Errorf("chunk %d of upload %q is empty", idx, id)
	}
	old := int64(len(up.parts[idx]))
	n := int64(len(data))
	if u.bytes-old+n > u.maxBytes {
		u.dropLocked(id, up)
		return "", false, fmt.Errorf("vision upload too large: over %d bytes of base64 in progress", u.maxBytes)
	}
	if old == 0 {
		up.have++
	}
	up.parts[idx] = data
	up.size += n - old
	u.bytes += n - old
	up.deadline = time.Now().Add(u.timeout)
	up.timer.Reset(u.timeout)
	if up.have < len(up.parts) {
		return "", false, nil
	}
	whole := strings.Join(up.parts, "")
	u.dropLocked(id, up)
	return whole, true, nil
}

func (u *uploads) dropLocked(id string, up *upload) {
	up.timer.Stop()
	if u.ups[id] == up {
		delete(u.ups, id)
		u.bytes -= up.size
	}
	up.parts = nil
}

func (u *uploads) expire(id string, up *upload) {
	u.mu.Lock()
	live := u.ups[id] == up && !time.Now().Before(up.deadline)
	if live {
		u.dropLocked(id, up)
	}
	u.mu.Unlock()
	if live && u.onExpire != nil {
		u.onExpire(id)
	}
}

// inFlight reports the uploads and base64 bytes held now.
func (u *uploads) inFlight() (int, int64) {
	u.mu.Lock()
	defer u.mu.Unlock()
	return len(u.ups), u.bytes
}

// close drops every upload.
func (u *uploads) close() {
	u.mu.Lock()
	defer u.mu.Unlock()
	for id, up := range u.ups {
		u.dropLocked(id, up)
	}
}
