package membership

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"
)

// Files of a closed swarm in a node's data dir.
const (
	// ConfigFile says that the node's swarm is closed, and whose it is.
	ConfigFile = "swarm.json"
	// OwnerKeyFile is the owner's key, on the owner's machine only.
	OwnerKeyFile = "swarm-owner.key"
)

// Config is the closed swarm a data dir belongs to.
type Config struct {
	Swarm string  `json:"swarm"`
	Owner peer.ID `json:"owner"`
}

// LoadConfig reads dir's closed-swarm config; ok is false when there is
// none (an open swarm).
func LoadConfig(dir string) (cfg Config, ok bool, err error) {
	b, err := os.ReadFile(filepath.Join(dir, ConfigFile))
	if errors.Is(err, fs.ErrNotExist) {
		return Config{}, false, nil
	}
	if err != nil {
		return Config{}, false, fmt.Errorf("read swarm config: %w", err)
	}
	if err := json.Unmarshal(b, &cfg); err != nil {
		return Config{}, false, fmt.Errorf("swarm config %s is corrupt: %w", filepath.Join(dir, ConfigFile), err)
	}
	if cfg.Swarm == "" || cfg.Owner.Validate() != nil {
		return Config{}, false, fmt.Errorf("swarm config %s lacks a swarm or an owner", filepath.Join(dir, ConfigFile))
	}
	return cfg, true, nil
}

// SaveConfig writes dir's closed-swarm config.
func SaveConfig(dir string, cfg Config) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("create data dir: %w", err)
	}
	b, err := json.MarshalIndent(cfg, "", "  ")
	if err != nil {
		return fmt.Errorf("encode swarm config: %w", err)
	}
	return writeFile(filepath.Join(dir, ConfigFile), string(b)+"\n")
}

// ErrExists is returned by Init for a data dir that already has a swarm.
var ErrExists = errors.New("this data dir already belongs to a closed swarm")

// Init creates a closed swarm in dir: a new owner key and the config.
func Init(dir, swarm string) (*Owner, error) {
	if _, ok, err := LoadConfig(dir); err != nil || ok {
		if err == nil {
			err = fmt.Errorf("%w (%s)", ErrExists, filepath.Join(dir, ConfigFile))
		}
		return nil, err
	}
	key, _, err := crypto.GenerateEd25519Key(nil)
	if err != nil {
		return nil, fmt.Errorf("generate owner key: %w", err)
	}
	o, err := NewOwner(key, swarm)
	if err != nil {
		return nil, err
	}
	b, err := crypto.MarshalPrivateKey(key)
	if err != nil {
		return nil, fmt.Errorf("encode owner key: %w", err)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create data dir: %w", err)
	}
	f, err := os.OpenFile(filepath.Join(dir, OwnerKeyFile), os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return nil, fmt.Errorf("write owner key: %w", err)
	}
	if _, err := f.Write(b); err != nil {
		f.Close()
		return nil, fmt.Errorf("write owner key: %w", err)
	}
	if err := f.Close(); err != nil {
		return nil, fmt.Errorf("write owner key: %w", err)
	}
	return o, SaveConfig(dir, Config{Swarm: swarm, Owner: o.ID()})
}

// LoadOwner reads dir's owner key; ok is false on a machine without it.
func LoadOwner(dir string) (o *Owner, ok bool, err error) {
	cfg, has, err := LoadConfig(dir)
	if err != nil || !has {
		return nil, false, err
	}
	path := filepath.Join(dir, OwnerKeyFile)
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, false, nil
	}
	if err != nil {
		return nil, false, fmt.Errorf("read owner key: %w", err)
	}
	if fi, err := os.Stat(path); err == nil && fi.Mode().Perm()&0o077 != 0 {
		return nil, false, fmt.Errorf("owner key %s is readable by others (mode %v): chmod 600 it", path, fi.Mode().Perm())
	}
	key, err := crypto.UnmarshalPrivateKey(b)
	if err != nil {
		return nil, false, fmt.Errorf("owner key %s is corrupt: %w", path, err)
	}
	o, err = NewOwner(key, cfg.Swarm)
	if err != nil {
		return nil, false, err
	}
	if o.ID() != cfg.Owner {
		return nil, false, fmt.Errorf("owner key %s is not the key of swarm owner %s", path, cfg.Owner)
	}
	return o, true, nil
}
