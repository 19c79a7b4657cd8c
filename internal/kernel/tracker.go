package kernel

// Tracker names a way for pre-dump to find the pages written between two
// rounds.
type Tracker string

// The trackers, best first.
const (
	// TrackerUffdWP: userfaultfd async write-protect on the target's
	// writable private VMAs, read and re-armed with PAGEMAP_SCAN (6.7+).
	TrackerUffdWP Tracker = "uffd-wp-async+pagemap-scan"
	// TrackerSoftDirty: clear_refs 4 and pagemap bit 55.
	TrackerSoftDirty Tracker = "soft-dirty"
	// TrackerFullCopy: no tracking; every round copies all memory.
	TrackerFullCopy Tracker = "full-copy"
)

// DirtyTracker returns the best tracker this kernel supports, probing the
// features it needs (once).
func (p *Probes) DirtyTracker() Tracker {
	switch {
	case p.Check("uffd-wp-async") == nil && p.Check("pagemap-scan") == nil:
		return TrackerUffdWP
	case p.Check("soft-dirty") == nil:
		return TrackerSoftDirty
	}
	return TrackerFullCopy
}
