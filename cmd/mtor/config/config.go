// Package config reads the file of `mtor node --config FILE`: TOML (.toml)
// or YAML (.yaml, .yml), one key per flag with the flag's own name, a
// list for a repeatable flag. The file only fills in what the command
// line leaves unset, so that a flag given on the command line wins.
package config

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"github.com/BurntSushi/toml"
	"go.yaml.in/yaml/v3"
)

// MaxSize bounds a config file: a node's flags fit in far less.
const MaxSize = 1 << 20

// Errors a config file can have; every error this package returns wraps
// one of them and names the file (and the key, where there is one).
var (
	ErrFormat     = errors.New("unknown config file format (want .toml, .yaml or .yml)")
	ErrSyntax     = errors.New("config file syntax")
	ErrTooLarge   = fmt.Errorf("config file larger than %d bytes", MaxSize)
	ErrUnknownKey = errors.New("unknown key")
	ErrValue      = errors.New("bad value")
)

// KeyError is a problem with one key of a config file.
type KeyError struct {
	Path string
	Key  string
	Err  error // ErrUnknownKey or ErrValue, possibly wrapped with detail
}

func (e *KeyError) Error() string {
	return fmt.Sprintf("config %s: key %q: %v", e.Path, e.Key, e.Err)
}

func (e *KeyError) Unwrap() error { return e.Err }

// Repeatable is implemented by flag values that take a list (the flag may
// be given several times): only they accept a list in the file.
type Repeatable interface {
	flag.Value
	Repeatable() bool
}

// File is a loaded config file: each key's values as the command line
// would give them.
type File struct {
	Path   string
	Values map[string][]string
	keys   []string // sorted, for stable errors
	// numbers are the keys a TOML file gave a number: its text is not
	// kept (1.10 reads as 1.1, 0x10 as 16, 1_000 as 1000), so only a flag
	// that takes a number (or a bool, a duration) may take it.
	numbers map[string]bool
}

// Load reads and parses path. It checks the syntax only; Apply checks the
// keys against the flags.
func Load(path string) (*File, error) {
	ext := strings.ToLower(filepath.Ext(path))
	if ext != ".toml" && ext != ".yaml" && ext != ".yml" {
		return nil, fmt.Errorf("config %s: %w", path, ErrFormat)
	}
	fh, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	defer fh.Close()
	data, err := io.ReadAll(io.LimitReader(fh, MaxSize+1))
	if err != nil {
		return nil, fmt.Errorf("config %s: %w", path, err)
	}
	if len(data) > MaxSize {
		return nil, fmt.Errorf("config %s: %w", path, ErrTooLarge)
	}
	f := &File{Path: path, Values: map[string][]string{}, numbers: map[string]bool{}}
	if ext == ".toml" {
		raw := map[string]any{}
		if _, err := toml.NewDecoder(bytes.NewReader(data)).Decode(&raw); err != nil {
			return nil, fmt.Errorf("config %s: %w: %v", path, ErrSyntax, err)
		}
		for k, v := range raw {
			f.numbers[k] = hasNumber(v)
			vals, err := values(v)
			if err != nil {
				return nil, &KeyError{Path: path, Key: k, Err: fmt.Errorf("%w: %v", ErrValue, err)}
			}
			f.Values[k] = vals
		}
	} else if err := f.loadYAML(data); err != nil {
		return nil, err
	}
	for k := range f.Values {
		f.keys = append(f.keys, k)
	}
	slices.Sort(f.keys)
	return f, nil
}

// loadYAML takes each value's text as written: decoded into Go values,
// YAML would make an unquoted 0123456 the octal 42798 and 1.10 the number
// 1.1, so that a key or a swarm name written as it looks became another.
func (f *File) loadYAML(data []byte) error {
	var doc yaml.Node
	if err := yaml.Unmarshal(data, &doc); err != nil {
		return fmt.Errorf("config %s: %w: %v", f.Path, ErrSyntax, err)
	}
	if len(doc.Content) == 0 {
		return nil // an empty YAML file is an empty config, not an error
	}
	m := doc.Content[0]
	if m.Kind != yaml.MappingNode {
		return fmt.Errorf("config %s: %w: want a mapping of keys to values", f.Path, ErrSyntax)
	}
	for i := 0; i+1 < len(m.Content); i += 2 {
		k, v := m.Content[i].Value, m.Content[i+1]
		if _, dup := f.Values[k]; dup {
			return fmt.Errorf("config %s: %w: key %q is given twice", f.Path, ErrSyntax, k)
		}
		vals, err := yamlValues(v)
		if err != nil {
			return &KeyError{Path: f.Path, Key: k, Err: fmt.Errorf("%w: %v", ErrValue, err)}
		}
		f.Values[k] = vals
	}
	return nil
}

// yamlValues is a scalar's text, or each of a list of scalars'.
func yamlValues(n *yaml.Node) ([]string, error) {
	scalar := func(n *yaml.Node) (string, error) {
		switch {
		case n.Kind == yaml.AliasNode && n.Alias != nil:
			n = n.Alias
		case n.Kind != yaml.ScalarNode:
			return "", errors.New("want a string, number, boolean or a list of them")
		}
		if n.Tag == "!!null" {
			return "", errors.New("empty value")
		}
		return n.Value, nil
	}
	if n.Kind == yaml.SequenceNode {
		out := make([]string, 0, len(n.Content))
		for _, e := range n.Content {
			s, err := scalar(e)
			if err != nil {
				return nil, fmt.Errorf("list element: %w", err)
			}
			out = append(out, s)
		}
		return out, nil
	}
	s, err := scalar(n)
	if err != nil {
		return nil, err
	}
	return []string{s}, nil
}

// hasNumber reports whether a decoded TOML value is a number or a list
// holding one.
func hasNumber(v any) bool {
	switch x := v.(type) {
	case []any:
		return slices.ContainsFunc(x, hasNumber)
	case int64, float64:
		return true
	}
	return false
}

// takesText reports whether fl's value is text (a string, or a list of
// them): a flag.Value that says otherwise through flag.Getter is not.
func takesText(fl *flag.Flag) bool {
	g, ok := fl.Value.(flag.Getter)
	if !ok {
		return true
	}
	_, ok = g.Get().(string)
	return ok
}

// values turns one decoded value into flag values: a scalar is one value,
// a list of scalars is several.
func values(v any) ([]string, error) {
	if l, ok := v.([]any); ok {
		out := make([]string, 0, len(l))
		for _, e := range l {
			s, err := scalar(e)
			if err != nil {
				return nil, fmt.Errorf("list element: %w", err)
			}
			out = append(out, s)
		}
		return out, nil
	}
	s, err := scalar(v)
	if err != nil {
		return nil, err
	}
	return []string{s}, nil
}

func scalar(v any) (string, error) {
	switch x := v.(type) {
	case string:
		return x, nil
	case bool:
		return strconv.FormatBool(x), nil
	case int:
		return strconv.Itoa(x), nil
	case int64:
		return strconv.FormatInt(x, 10), nil
	case uint64:
		return strconv.FormatUint(x, 10), nil
	case float64:
		if x == math.Trunc(x) && math.Abs(x) < 1<<53 {
			return strconv.FormatInt(int64(x), 10), nil
		}
		return strconv.FormatFloat(x, 'g', -1, 64), nil
	case nil:
		return "", errors.New("empty value")
	}
	return "", fmt.Errorf("want a string, number, boolean or a list of them, not %T", v)
}

// Apply sets on fs the file's value of every flag that the command line
// did not set (set reports those). A key that is no flag of fs, or is in
// reserved (the --config flag itself), is an error naming it and the file.
func (f *File) Apply(fs *flag.FlagSet, set func(name string) bool, reserved ...string) error {
	for _, k := range f.keys {
		fl := fs.Lookup(k)
		if fl == nil || slices.Contains(reserved, k) {
			return &KeyError{Path: f.Path, Key: k, Err: fmt.Errorf("%w (the keys are the flags of 'mtor node -h', without the dashes)", ErrUnknownKey)}
		}
		vals := f.Values[k]
		if r, ok := fl.Value.(Repeatable); !ok || !r.Repeatable() {
			if len(vals) != 1 {
				return &KeyError{Path: f.Path, Key: k, Err: fmt.Errorf("%w: takes one value, not a list", ErrValue)}
			}
		}
		if f.numbers[k] && takesText(fl) {
			// A name or key that looks like a number (swarm = 1.10, a
			// key 0x10) would become another one (1.1, 16) without a word.
			return &KeyError{Path: f.Path, Key: k, Err: fmt.Errorf("%w: %s is a TOML number, whose text is not kept (1.10 reads as 1.1, 0x10 as 16), and the flag takes text; write it in quotes: %s = \"...\"", ErrValue, strings.Join(vals, ", "), k)}
		}
		if set(k) {
			continue // the command line wins
		}
		for _, v := range vals {
			if err := fs.Set(k, v); err != nil {
				return &KeyError{Path: f.Path, Key: k, Err: fmt.Errorf("%w: %v", ErrValue, err)}
			}
		}
	}
	return nil
}
