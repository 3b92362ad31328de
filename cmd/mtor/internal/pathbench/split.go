package pathbench

import "time"

// CPUSplit is a process's CPU per answer split into what it pays once per
// answer (the request, the stream, the receipt) and what it pays for each
// token: CPU per answer ≈ PerAnswer + PerToken × tokens.
type CPUSplit struct {
	PerAnswer time.Duration `json:"per_answer_ns"`
	PerToken  time.Duration `json:"per_token_ns"`
}

// SplitCPU fits proc's CPU per answer over rows of one path and
// concurrency with answers of different lengths, by least squares. It
// reports false unless at least two lengths have answers and CPU for
// proc. Either part can come out below zero when the rows are noisy.
func SplitCPU(rows []Result, proc string) (CPUSplit, bool) {
	var xs, ys []float64
	for _, r := range rows {
		ok := int64(r.Queries) - r.Errors
		t, has := r.CPU[proc]
		if ok <= 0 || r.Tokens <= 0 || !has {
			continue
		}
		xs = append(xs, float64(r.Tokens))
		ys = append(ys, float64(t)/float64(ok))
	}
	if len(xs) < 2 {
		return CPUSplit{}, false
	}
	var mx, my float64
	for i := range xs {
		mx += xs[i]
		my += ys[i]
	}
	mx /= float64(len(xs))
	my /= float64(len(ys))
	var sxy, sxx float64
	for i := range xs {
		sxy += (xs[i] - mx) * (ys[i] - my)
		sxx += (xs[i] - mx) * (xs[i] - mx)
	}
	if sxx == 0 { // one length only, however many rows
		return CPUSplit{}, false
	}
	b := sxy / sxx
	return CPUSplit{PerAnswer: time.Duration(my - b*mx), PerToken: time.Duration(b)}, true
}
