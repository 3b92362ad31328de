package ws

// Test hooks.

// MaxQueuedBytes is the most bytes ever queued for any connection still
// open or already closed, since the server started.
func (s *Server) MaxQueuedBytes() int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.maxQueued
}

// SeedSafe exposes the answer escaping for the seed client.
var SeedSafe = seedSafe
