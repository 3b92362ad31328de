package main

import golog "github.com/ipfs/go-log/v2"

// fxLogSubsystem is go-libp2p's subsystem for its fx logger, which reports
// a host that fails to start (a --listen address not on this machine) as
// three multi-line error records before libp2p.New returns the same error,
// which the CLI then prints as its one line.
const fxLogSubsystem = "p2p-config"

// quietHostStart mutes that subsystem while a node starts, unless its level
// asks for more than errors (--log-level, GOLOG_LOG_LEVEL); the returned
// func restores the level.
func quietHostStart() (restore func()) {
	prev, err := golog.SubsystemLevelName(fxLogSubsystem)
	if err != nil { // no such logger yet: it will get the default level
		prev = golog.DefaultLevel().String()
	}
	if lvl, err := golog.Parse(prev); err != nil || lvl < golog.LevelError {
		return func() {}
	}
	if err := golog.SetLogLevel(fxLogSubsystem, golog.LevelFatal.String()); err != nil {
		return func() {}
	}
	return func() { _ = golog.SetLogLevel(fxLogSubsystem, prev) }
}
