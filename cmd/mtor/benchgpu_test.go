package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestBenchGPUScript runs make bench-gpu's script end to end here, with
// the GPU faked (testdata/benchgpu/fakegpu): a fake nvidia-smi and a fake
// libnvidia-ml.so.1 for mtor's NVML, one 50 W GPU whose energy counter
// grows by exactly that, and fake torch and transformers modules, a
// "model" that streams fixed words, loaded from a model directory or, with
// BENCH_GPU_RANDOM_WEIGHTS=1, built from testdata/benchgpu/tinyllama-shape
// with the server's stand-in tokenizer. The script, its model server
// (openai_server.py) and energy reader (nvml_energy.py), the real mtor
// node in front of them, with its real NVML binding, and mtor query as the
// client are checked here, so that a GPU machine's few lent minutes go to
// the figures, not to the script's mistakes. No figure is asserted, only
// that each query and token is counted, that mtor measured energy, and
// that it never counts more than the counter moved around the same
// queries. With -v the tables are logged (docs/benchmarks.md quotes them).
func TestBenchGPUScript(t *testing.T) {
	needBinary(t)
	for _, tool := range []string{"bash", "python3", "awk"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("the bench-gpu script needs %s", tool)
		}
	}
	script, err := filepath.Abs("testdata/benchgpu/bench-gpu.sh")
	if err != nil {
		t.Fatal(err)
	}
	fake := filepath.Join(filepath.Dir(script), "fakegpu")
	lib := fakeNVML(t)
	model := t.TempDir()
	if err := os.WriteFile(filepath.Join(model, "config.json"), []byte("{}\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	run := func(t *testing.T, withGPU bool, env []string, args ...string) (string, int) {
		t.Helper()
		ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
		defer cancel()
		cmd := exec.CommandContext(ctx, script, args...)
		path := os.Getenv("PATH")
		if withGPU {
			path = fake + string(os.PathListSeparator) + path
		}
		cmd.Env = append(os.Environ(), "PATH="+path, "PYTHONPATH="+filepath.Join(fake, "py"), "LD_LIBRARY_PATH="+lib,
			"BENCH_GPU_SEQ=3", "BENCH_GPU_CONC=2", "BENCH_GPU_ROUNDS=2", "BENCH_GPU_MAX_TOKENS=8",
			fmt.Sprintf("FAKE_MODEL_TOKEN_SECONDS=%g", fakeTokenSeconds))
		cmd.Env = append(cmd.Env, env...)
		cmd.WaitDelay = 5 * time.Second
		out, err := cmd.CombinedOutput()
		var ee *exec.ExitError
		switch {
		case err == nil:
			return string(out), 0
		case errors.As(err, &ee):
			return string(out), ee.ExitCode()
		}
		t.Fatalf("%s: %v\n%s", script, err, out)
		return "", 0
	}

	t.Run("no GPU", func(t *testing.T) {
		if _, err := exec.LookPath("nvidia-smi"); err == nil {
			t.Skip("this machine has an nvidia-smi")
		}
		out, code := run(t, false, nil, model, e2eBin)
		if code != 0 || !strings.Contains(out, "bench-gpu: skipped: no NVIDIA GPU here") {
			t.Fatalf("exit %d, want 0 and the skip line:\n%s", code, out)
		}
	})
	t.Run("no model", func(t *testing.T) {
		out, code := run(t, true, nil)
		if code != 2 || !strings.Contains(out, "usage:") {
			t.Fatalf("exit %d, want 2 and the usage line:\n%s", code, out)
		}
	})
	shape := filepath.Join(filepath.Dir(script), "tinyllama-shape")
	for _, tc := range []struct {
		name, model string
		env         []string
		lines       []string // in the output besides the common ones
	}{
		{"fake GPU", model, nil, []string{
			"GPU: FAKE GPU for tests; model: " + model + "; max_tokens 8",
			"model server: loaded " + model + " as 'bench-model'",
			"warm-up answer: the keeper lit the lamp and watched the\n", // the model's tokenizer, 8 tokens
		}},
		{"fake GPU, random weights", shape, []string{"BENCH_GPU_RANDOM_WEIGHTS=1"}, []string{
			"GPU: FAKE GPU for tests; model: " + shape + " (random weights, stand-in tokenizer); max_tokens 8",
			"model server: loaded " + shape + " (random weights) as 'bench-model'",
			"warm-up answer: t0 t1 t2 t3 t4 t5 t6 t7", // the stand-in tokenizer
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, code := run(t, true, tc.env, tc.model, e2eBin)
			if code != 0 {
				t.Fatalf("exit %d:\n%s", code, out)
			}
			for _, want := range append([]string{
				"idle power: 50.0 W; busy power (concurrency 2): 50.0 W",
				"mtor node: gpu: 1 GPU(s): FAKE GPU for tests",
				"J/token, TTFT p50 ", "; GPU FAKE GPU for tests, VRAM ",
			}, tc.lines...) {
				if !strings.Contains(out, want) {
					t.Errorf("no %q in the output", want)
				}
			}
			// 3 queries of 8 tokens one after the other, then 2 rounds of 2.
			for _, rc := range []struct {
				label            string
				queries, windows int
			}{{"concurrency 1", 3, 3}, {"concurrency 2", 4, 2}} {
				row := benchGPURow(t, out, rc.label)
				if row.queries != rc.queries || row.windows != rc.windows || row.tokens != 8*rc.queries {
					t.Errorf("%s: %d queries in %d windows, %d tokens; want %d in %d, %d tokens",
						rc.label, row.queries, row.windows, row.tokens, rc.queries, rc.windows, 8*rc.queries)
				}
				if row.nvmlMJ <= 0 || row.nvmlJPerToken <= 0 || row.nvmlJPerQuery <= 0 {
					t.Errorf("%s: the fake GPU's counter moved by %v mJ (%v J/token, %v J/query), want more than 0",
						rc.label, row.nvmlMJ, row.nvmlJPerToken, row.nvmlJPerQuery)
				}
				// mtor reads the same counter within each window, and shares
				// what it read among the queries in flight, never more.
				if row.mtorMJ <= 0 || row.mtorMJ > row.nvmlMJ {
					t.Errorf("%s: mtor counted %v mJ, the counter moved by %v around the same queries; want 0 < mtor <= that", rc.label, row.mtorMJ, row.nvmlMJ)
				}
				// Never faster than the fake model streams.
				if row.tokensPerSec <= 0 || row.tokensPerSec > float64(rc.queries/rc.windows)/fakeTokenSeconds {
					t.Errorf("%s: %v tokens/s, want above 0 and at most what the fake model makes", rc.label, row.tokensPerSec)
				}
			}
			if t.Failed() {
				t.Logf("output:\n%s", out)
			} else {
				t.Logf("%s", out[strings.Index(out, "\nGPU: ")+1:])
			}
		})
	}
}

// fakeTokenSeconds is the fake model's pace: long enough that a query's
// own time, which mtor measures, outweighs the start-up of the tools
// around it.
const fakeTokenSeconds = 0.03

// fakeNVML builds the fake libnvidia-ml.so.1 (testdata/benchgpu/fakegpu/
// fake_nvml.c) and returns its directory, for a node's LD_LIBRARY_PATH:
// one GPU drawing FAKE_GPU_WATTS (50 by default) of the node's environment.
func fakeNVML(t *testing.T) string {
	t.Helper()
	if _, err := exec.LookPath("cc"); err != nil {
		t.Skip("the fake NVML needs a C compiler (cc)")
	}
	lib := t.TempDir()
	if out, err := exec.Command("cc", "-shared", "-fPIC", "-o", filepath.Join(lib, "libnvidia-ml.so.1"), filepath.Join("testdata", "benchgpu", "fakegpu", "fake_nvml.c")).CombinedOutput(); err != nil {
		t.Fatalf("building the fake NVML: %v\n%s", err, out)
	}
	return lib
}

type benchGPURowFigures struct {
	queries, windows, tokens                                   int
	mtorMJ, nvmlMJ, nvmlJPerToken, nvmlJPerQuery, tokensPerSec float64
}

// benchGPURow parses the script's table row for label: | label | Q (W
// windows) | tokens | mtor mJ | NVML mJ | ratio | J/token mtor | J/token NVML
// | J/query NVML | tokens/s |.
func benchGPURow(t *testing.T, out, label string) benchGPURowFigures {
	t.Helper()
	re := regexp.MustCompile(`(?m)^\| ` + regexp.QuoteMeta(label) + ` \| (\d+) \((\d+) windows\) \| (\d+) \| (\d+) \| (\d+) \| [\d.]+ \| [\d.]+ \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$`)
	m := re.FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("no table row %q in the output:\n%s", label, out)
	}
	var f benchGPURowFigures
	var err error
	ints := []*int{&f.queries, &f.windows, &f.tokens}
	for i, p := range ints {
		if *p, err = strconv.Atoi(m[i+1]); err != nil {
			t.Fatal(err)
		}
	}
	for i, p := range []*float64{&f.mtorMJ, &f.nvmlMJ, &f.nvmlJPerToken, &f.nvmlJPerQuery, &f.tokensPerSec} {
		if *p, err = strconv.ParseFloat(m[i+4], 64); err != nil {
			t.Fatal(err)
		}
	}
	return f
}
