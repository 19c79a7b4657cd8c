package kernel

// DirtyTracker names the mechanism pre-dump would use to find pages
// written between rounds, in order of preference.
func (p *Probes) DirtyTracker() string {
	if p.Check("uffd-wp-async") == nil && p.Check("pagemap-scan") == nil {
		return "uffd-wp-async+pagemap-scan"
	}
	if p.Check("soft-dirty") == nil {
		return "soft-dirty"
	}
	return "full-copy"
}
