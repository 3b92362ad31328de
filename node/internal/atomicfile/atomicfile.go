// Package atomicfile replaces a file's contents so that a crash or a power
// loss leaves either the old contents or the new, never a file cut short
// or empty: the node's ledger and membership state live in such files.
package atomicfile

import (
	"fmt"
	"os"
	"path/filepath"
)

// Write puts data in path: it writes a temporary file beside it, syncs it
// to the disk, renames it over path and syncs the directory, so that the
// rename itself survives a power loss.
func Write(path string, data []byte, perm os.FileMode) error {
	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, perm)
	if err != nil {
		return fmt.Errorf("write %s: %w", tmp, err)
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return fmt.Errorf("write %s: %w", tmp, err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return fmt.Errorf("sync %s: %w", tmp, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("write %s: %w", tmp, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("rename %s: %w", tmp, err)
	}
	if d, err := os.Open(filepath.Dir(path)); err == nil {
		_ = d.Sync() // best effort: not every file system syncs a directory
		_ = d.Close()
	}
	return nil
}
