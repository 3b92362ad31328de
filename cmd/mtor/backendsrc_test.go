package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestBackendFlagsBeatTheFileAsAPair: --backend and --no-detect on the
// command line replace both of the config file's, so the file's half of
// the pair neither clashes with the command line's nor comes back at start
// or reload.
func TestBackendFlagsBeatTheFileAsAPair(t *testing.T) {
	for _, tc := range []struct {
		name, file string
		args       []string
		want       string // the backends served, space separated
	}{
		{"file no-detect, command-line backend", "no-detect = true\n", []string{"--backend", "demo"}, "demo"},
		{"file backends, command-line no-detect", "backend = [\"demo\"]\n", []string{"--no-detect"}, ""},
		{"file backends alone", "backend = [\"demo\"]\n", nil, "demo"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			cfg := filepath.Join(dir, "node.toml")
			if err := os.WriteFile(cfg, []byte(tc.file), 0o600); err != nil {
				t.Fatal(err)
			}
			e := &env{stdout: &bytes.Buffer{}, stderr: &bytes.Buffer{}, getenv: func(string) string { return "" }}
			args := append([]string{"--data-dir", dir, "--config", cfg}, tc.args...)
			f, src, err := parseNodeFlags(e, args)
			if err != nil {
				t.Fatal(err)
			}
			specs, err := src.specs(context.Background(), e)
			if err != nil {
				t.Fatal(err)
			}
			if got := strings.Join(specs, " "); got != tc.want || strings.Join(f.backends, " ") != tc.want {
				t.Fatalf("served %q (flags %q), want %q", got, f.backends, tc.want)
			}
		})
	}
}
