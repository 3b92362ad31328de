package spec

import (
	"strings"
	"testing"
)

func TestParse(t *testing.T) {
	t.Setenv("MTOR_TEST_KEY", "sk-test")
	tests := []struct {
		spec     string
		wantKind string
		wantErr  string
	}{
		{"demo", "demo", ""},
		{"demo:delay=0", "demo", ""},
		{"demo:delay=15ms,model=tiny", "demo", ""},
		{"demo:delay=-1s", "", "out of range"},
		{"demo:colour=blue", "", "unknown demo option"},
		{"ollama=http://127.0.0.1:11434", "ollama", ""},
		{"openai=http://127.0.0.1:8080/v1", "openai", ""},
		{"openai=http://127.0.0.1:8080,key=env:MTOR_TEST_KEY", "openai", ""},
		{"openai=http://127.0.0.1:8080,key=env:MTOR_NO_SUCH_VAR", "", "not set"},
		{"openai=http://127.0.0.1:8080,types=m1:chat+vision;m2:embed", "openai", ""},
		{"openai=http://127.0.0.1:8080,types=m1:paint", "", "unknown query type"},
		{"openai=http://127.0.0.1:8080,types=llama3.1:8b:chat+vision;nomic:embed", "openai", ""},
		{"openai=http://127.0.0.1:8080,types=chat", "", "want MODEL:type"},
		{"rentahal=http://127.0.0.1:5000,model=llava,types=chat+vision", "rentahal", ""},
		{"a1111=http://127.0.0.1:7860", "a1111", ""},
		{"a1111=http://127.0.0.1:7860,steps=3", "", "unknown parameter"},
		{"ollama=ftp://x", "", "not an http(s) URL"},
		{"ollama", "", "want KIND=URL"},
		{"vllm=http://127.0.0.1:8000", "", "unknown backend kind"},
		{"foo=bar", "", `unknown backend kind "foo" (kinds: demo, ollama=URL`},
	}
	for _, tc := range tests {
		t.Run(tc.spec, func(t *testing.T) {
			b, err := Parse(tc.spec, "me")
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err = %v, want one containing %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if b.Kind() != tc.wantKind {
				t.Fatalf("kind = %q, want %q", b.Kind(), tc.wantKind)
			}
		})
	}
}
