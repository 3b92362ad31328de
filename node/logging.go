package node

import (
	"context"
	"log/slog"
)

// ErrorText wraps a slog handler so that error values are logged as their
// message. go-log's slog bridge encodes a value of kind Any by reflection,
// which turns most errors (structs with unexported fields) into "{}";
// go-libp2p logs its errors that way.
func ErrorText(h slog.Handler) slog.Handler { return errorText{h} }

type errorText struct{ slog.Handler }

func (e errorText) Handle(ctx context.Context, r slog.Record) error {
	fixed := false
	r.Attrs(func(a slog.Attr) bool {
		if _, ok := a.Value.Any().(error); ok && a.Value.Kind() == slog.KindAny {
			fixed = true
			return false
		}
		return true
	})
	if !fixed {
		return e.Handler.Handle(ctx, r)
	}
	out := slog.NewRecord(r.Time, r.Level, r.Message, r.PC)
	r.Attrs(func(a slog.Attr) bool {
		out.AddAttrs(errorAttr(a))
		return true
	})
	return e.Handler.Handle(ctx, out)
}

func (e errorText) WithAttrs(attrs []slog.Attr) slog.Handler {
	fixed := make([]slog.Attr, len(attrs))
	for i, a := range attrs {
		fixed[i] = errorAttr(a)
	}
	return errorText{e.Handler.WithAttrs(fixed)}
}

func (e errorText) WithGroup(name string) slog.Handler { return errorText{e.Handler.WithGroup(name)} }

func errorAttr(a slog.Attr) slog.Attr {
	if a.Value.Kind() != slog.KindAny {
		return a
	}
	if err, ok := a.Value.Any().(error); ok && err != nil {
		return slog.String(a.Key, err.Error())
	}
	return a
}
