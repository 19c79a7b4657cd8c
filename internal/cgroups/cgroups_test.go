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

func TestParsePropsSpec(t *testing.T) {
	spec, err := ParsePropsSpec("test", `
"cpu":
 - "strategy": "replace"
 - "properties": ["cpu.shares", "cpu.cfs_period_us"]
memory:
 - properties: [memory.move_charge_at_immigrate]
`)
	if err != nil {
		t.Fatal(err)
	}
	if r := spec["cpu"]; !r.Replace || len(r.Props) != 2 || r.Props[1] != "cpu.cfs_period_us" {
		t.Fatalf("cpu: %+v", r)
	}
	if got := propsOf("memory", spec); got[len(got)-1] != "memory.move_charge_at_immigrate" || len(got) != len(props["memory"])+1 {
		t.Fatalf("memory merged: %v", got)
	}
	if got := propsOf("cpu", spec); len(got) != 2 {
		t.Fatalf("cpu replaced: %v", got)
	}
	for _, bad := range []string{`"cpu": - "strategy": "swap"`, `"cpu" - x`, `"memory": - "properties": ["release_agent"]`, `"memory": - "properties": ["cgroup.procs"]`} {
		if _, err := ParsePropsSpec("test", bad); err == nil {
			t.Errorf("%q: no error", bad)
		}
	}
}
