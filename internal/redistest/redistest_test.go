package redistest

import "testing"

func TestStartKillRestart(t *testing.T) {
	s := Start(t)
	if !s.ping() {
		t.Fatal("a started server does not answer")
	}
	s.Kill(t)
	if s.ping() {
		t.Fatal("a killed server answers")
	}
	s.Restart(t)
	if !s.ping() {
		t.Fatal("a restarted server does not answer")
	}
}
