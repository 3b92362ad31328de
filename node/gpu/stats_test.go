package gpu

import (
	"math"
	"testing"
)

func near(a, b float32) bool { return math.Abs(float64(a-b)) < 1e-6 }

func TestEnergyStats(t *testing.T) {
	type rec struct {
		model  string
		mJ     uint64
		tokens uint32
	}
	for _, tc := range []struct {
		name  string
		alpha float64
		recs  []rec
		model string
		want  float32 // J/token
	}{
		{"unknown model", 0.5, nil, "m", 0},
		{"first query sets the figure", 0.5, []rec{{"m", 2000, 10}}, "m", 0.2},
		{"moving average", 0.5, []rec{{"m", 2000, 10}, {"m", 6000, 10}}, "m", 0.4},
		// E = 1000 + .5(100000-1000) = 50500 mJ, T = 1 + .5(100-1) = 50.5: 1 J/token.
		{"weighted by size", 0.5, []rec{{"m", 1000, 1}, {"m", 100000, 100}}, "m", 1.0},
		{"queries without tokens are ignored", 0.5, []rec{{"m", 2000, 10}, {"m", 999999, 0}}, "m", 0.2},
		{"per model", 0.5, []rec{{"a", 2000, 10}, {"b", 9000, 10}}, "a", 0.2},
		{"alpha 1 keeps the last query", 1, []rec{{"m", 2000, 10}, {"m", 5000, 10}}, "m", 0.5},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := NewEnergyStats(WithAlpha(tc.alpha))
			for _, r := range tc.recs {
				s.Record(r.model, r.mJ, r.tokens)
			}
			if got := s.JoulesPerToken(tc.model); !near(got, tc.want) {
				t.Fatalf("JoulesPerToken = %v, want %v", got, tc.want)
			}
		})
	}
}

func TestEnergyStatsBounds(t *testing.T) {
	s := NewEnergyStats(WithMaxModels(2))
	s.Record("a", 1000, 10)
	s.Record("b", 1000, 10)
	s.Record("c", 1000, 10)
	if s.JoulesPerToken("c") != 0 {
		t.Fatal("a third model was tracked beyond the bound")
	}
	s.Forget("a")
	if s.JoulesPerToken("a") != 0 {
		t.Fatal("forgotten model still reported")
	}
	s.Record("c", 3000, 10)
	if !near(s.JoulesPerToken("c"), 0.3) {
		t.Fatalf("c = %v after Forget made room", s.JoulesPerToken("c"))
	}
	// An invalid alpha keeps the default.
	if NewEnergyStats(WithAlpha(0)).alpha != DefaultAlpha || NewEnergyStats(WithAlpha(2)).alpha != DefaultAlpha {
		t.Fatal("invalid alpha accepted")
	}
}
