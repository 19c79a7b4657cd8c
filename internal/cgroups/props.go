package cgroups

import (
	"fmt"
	"os"
	"slices"
	"strings"
)

// PropsSpec says, by controller, which properties a dump saves beyond
// (or instead of) ferry's own (criu's --cgroup-props).
type PropsSpec map[string]PropsRule

// PropsRule is one controller's entry of a PropsSpec: its properties,
// added to ferry's ("merge") or in their place ("replace").
type PropsRule struct {
	Replace bool
	Props   []string
}

// ParsePropsSpec parses criu's --cgroup-props notation:
//
//	"cpu":
//	 - "strategy": "replace"
//	 - "properties": ["cpu.shares", "cpu.cfs_period_us"]
//	"memory":
//	 - "strategy": "merge"
//	 - "properties": ["memory.limit_in_bytes"]
//
// (quotes optional; the strategy defaults to merge). name says where the
// text comes from, for errors.
func ParsePropsSpec(name, text string) (PropsSpec, error) {
	var toks []string
	for i := 0; i < len(text); {
		c := text[i]
		switch {
		case c == ' ' || c == '\t' || c == '\n' || c == '\r':
			i++
		case c == '#':
			for i < len(text) && text[i] != '\n' {
				i++
			}
		case strings.IndexByte(":-[],", c) >= 0:
			toks = append(toks, string(c))
			i++
		case c == '"':
			j := strings.IndexByte(text[i+1:], '"')
			if j < 0 {
				return nil, fmt.Errorf("%s: a quote not closed at byte %d", name, i)
			}
			toks = append(toks, text[i+1:i+1+j])
			i += j + 2
		default:
			j := i
			for j < len(text) && strings.IndexByte(" \t\r\n:-[],\"#", text[j]) < 0 {
				j++
			}
			toks = append(toks, text[i:j])
			i = j
		}
	}
	spec := PropsSpec{}
	bad := func(what string) error { return fmt.Errorf("%s: %s (want criu's --cgroup-props notation)", name, what) }
	for i := 0; i < len(toks); {
		if i+1 >= len(toks) || toks[i+1] != ":" || strings.ContainsAny(toks[i], "-[],:") {
			return nil, bad(fmt.Sprintf("a controller name and ':' expected at %q", toks[i]))
		}
		ctrl, rule := toks[i], PropsRule{}
		i += 2
		for i < len(toks) && toks[i] == "-" {
			if i+2 >= len(toks) || toks[i+2] != ":" {
				return nil, bad("'- key:' expected under " + ctrl)
			}
			key := toks[i+1]
			i += 3
			switch key {
			case "strategy":
				if i >= len(toks) || toks[i] != "replace" && toks[i] != "merge" {
					return nil, bad(ctrl + ": strategy: want replace or merge")
				}
				rule.Replace = toks[i] == "replace"
				i++
			case "properties":
				if i >= len(toks) || toks[i] != "[" {
					return nil, bad(ctrl + ": properties: a [list] expected")
				}
				for i++; i < len(toks) && toks[i] != "]"; i++ {
					if toks[i] == "," {
						continue
					}
					if !Settable(toks[i]) {
						return nil, bad(fmt.Sprintf("%s: property %q is not one of a controller's", ctrl, toks[i]))
					}
					rule.Props = append(rule.Props, toks[i])
				}
				if i >= len(toks) {
					return nil, bad(ctrl + ": properties: ']' missing")
				}
				i++
			default:
				return nil, bad(fmt.Sprintf("%s: unknown key %q", ctrl, key))
			}
		}
		spec[ctrl] = rule
	}
	return spec, nil
}

// propsOf is the properties saved of controller c under spec.
func propsOf(c string, spec PropsSpec) []string {
	r, ok := spec[c]
	if !ok {
		return props[c]
	}
	if r.Replace {
		return r.Props
	}
	out := slices.Clone(props[c])
	for _, p := range r.Props {
		if !slices.Contains(out, p) {
			out = append(out, p)
		}
	}
	return out
}

// Settable tells whether name is a property file ferry may write: one
// it saves itself, or a controller's own ("memory.swappiness"), never the
// cgroup core's ("cgroup.procs", "release_agent", "tasks").
func Settable(name string) bool {
	if known(name) {
		return true
	}
	ctrl, rest, ok := strings.Cut(name, ".")
	return ok && rest != "" && !strings.ContainsAny(name, "/\x00") && ctrl != "cgroup" && controllers()[ctrl]
}

// controllers are the controllers this kernel has (v1 and v2 names).
func controllers() map[string]bool {
	out := map[string]bool{"cpu": true, "cpuset": true, "memory": true, "io": true, "pids": true, "hugetlb": true, "rdma": true, "misc": true}
	if b, err := os.ReadFile("/proc/cgroups"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if f := strings.Fields(l); len(f) > 0 && !strings.HasPrefix(f[0], "#") {
				out[f[0]] = true
			}
		}
	}
	return out
}
