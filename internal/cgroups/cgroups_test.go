package cgroups

import "testing"

func TestParse(t *testing.T) {
	got, err := parse("cgroup", []byte("9:name=systemd:/\n4:memory:/a/b\n2:cpu,cpuacct:/x\n0::/u\n"))
	if err != nil {
		t.Fatal(err)
	}
	want := []Ref{{"name=systemd", "/"}, {"memory", "/a/b"}, {"cpu,cpuacct", "/x"}, {"", "/u"}}
	if len(got) != len(want) {
		t.Fatalf("%v", got)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("%v, want %v", got, want)
		}
	}
	if _, err := parse("cgroup", []byte("bad\n")); err == nil {
		t.Fatal("a bad line parsed")
	}
	if Normalize("cpuacct,cpu") != "cpu,cpuacct" {
		t.Fatal(Normalize("cpuacct,cpu"))
	}
}
