package keys

import (
	"encoding/binary"
	"hash/maphash"
	"maps"
	"math"
	"math/bits"
	"reflect"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vigthoria/caddy-vigthoria/policy"
	"github.com/vigthoria/caddy-vigthoria/store"
)

// The index identifies a caller from memory, without locks: readers load
// the current view once and probe its table with atomic loads, while one
// writer at a time (the sync loop) appends entries and then publishes
// them. Per key it holds a 64-byte entry, the key's ID and name packed
// into shared strings, an 8-byte slot in the table by hash and a 4-byte
// one in the table by ID, at most three quarters full: about 120 bytes a
// key, and no per-key pointers or maps for the collector to trace.

// entry is one live key. Once a view holding it is published it never
// changes, but for lastUsed; a rotated or revoked key's entry is left
// behind, dead, until the next rebuild.
type entry struct {
	hash     store.Hash
	text     string        // the key's ID, then its name
	expires  int64         // unix milliseconds; 0: never
	lastUsed atomic.Uint32 // unix seconds of the last use recorded
	tier     uint16        // in view.tiers
	idLen    uint8
}

func (e *entry) id() string   { return e.text[:e.idLen] }
func (e *entry) name() string { return e.text[e.idLen:] }

// A slot of a table is 0 when empty, else an entry's index + 1 in the low
// 32 bits (tombstone once removed) and, in view.slots, a fingerprint of
// the key's hash in the high 32 bits, which settles most probes without
// touching the entry.
const tombstone = math.MaxUint32

// Limits of what an entry can hold; the index skips other records.
const (
	maxIndexedIDLen = math.MaxUint8
	maxTiers        = math.MaxUint16 + 1
	maxEntries      = math.MaxInt32 // entry indexes fit a slot's 32 bits
)

// view is what a reader sees: an open-addressing (linear probing) table
// over entries. A writer may fill slots and append entries past
// len(entries) of a published view, never change what it holds.
type view struct {
	slots   []atomic.Uint64
	entries []entry
	tiers   []string
}

// home is the first slot to probe for h in a table of n slots.
func home(h *store.Hash, n int) int {
	hi, _ := bits.Mul64(binary.LittleEndian.Uint64(h[:8]), uint64(n))
	return int(hi)
}

// fingerprint is what a slot holds of h, in its high 32 bits.
func fingerprint(h *store.Hash) uint64 {
	return uint64(binary.LittleEndian.Uint32(h[8:12])) << 32
}

// lookup returns the entry with hash h, or nil. It allocates nothing and
// takes no lock.
func (v *view) lookup(h *store.Hash) *entry {
	n := len(v.slots)
	if n == 0 {
		return nil
	}
	fp := fingerprint(h)
	for i := home(h, n); ; {
		s := v.slots[i].Load()
		if s == 0 {
			return nil
		}
		// An index past len(entries) is from a newer view: not there yet.
		if s&^math.MaxUint32 == fp && uint32(s) != tombstone && int(uint32(s)-1) < len(v.entries) {
			if e := &v.entries[uint32(s)-1]; e.hash == *h {
				return e
			}
		}
		if i++; i == n {
			i = 0
		}
	}
}

// insert puts entry idx with hash h into the first free slot.
func (v *view) insert(h *store.Hash, idx uint32) {
	n := len(v.slots)
	for i := home(h, n); ; {
		if s := v.slots[i].Load(); s == 0 || uint32(s) == tombstone {
			v.slots[i].Store(fingerprint(h) | uint64(idx+1))
			return
		}
		if i++; i == n {
			i = 0
		}
	}
}

// slotOf returns the position of the slot of entry idx with hash h, or -1.
func (v *view) slotOf(h *store.Hash, idx uint32) int {
	n := len(v.slots)
	for i := home(h, n); ; {
		s := v.slots[i].Load()
		if s == 0 {
			return -1
		}
		if uint32(s) == idx+1 {
			return i
		}
		if i++; i == n {
			i = 0
		}
	}
}

// index is the in-memory set of live keys. Its zero value is empty and
// ready; lookups are safe for concurrent use with each other and with
// the writing methods.
type index struct {
	cur atomic.Pointer[view]
	// minters are the live keys that may mint tokens, by ID: few, and
	// looked up without a lock for every request of a minted token.
	minters atomic.Pointer[map[string]minter]
	// settings are the live keys' own settings, by ID, of the keys that
	// have any: looked up without a lock for every request, and costing
	// one atomic load when no key has settings.
	settings atomic.Pointer[map[string]*policy.Settings]

	mu    sync.Mutex // serializes writers; protects the following
	ids   []uint32   // table of entries by ID, slots as described above
	seed  maphash.Seed
	tiers []string          // the tiers of the next view
	tierN map[string]uint16 // positions in tiers
	texts textArena
	live  int
}

// minter is what the index keeps of a key that may mint tokens.
type minter struct {
	tier    string
	mint    []string // the tiers it may mint tokens of
	expires int64    // unix milliseconds; 0: never
}

// minter returns the minting rights of the live key id.
func (ix *index) minter(id string) (minter, bool) {
	if m := ix.minters.Load(); m != nil {
		mt, ok := (*m)[id]
		return mt, ok
	}
	return minter{}, false
}

// noteMinters brings the minters up to date with recs, changed in that
// order, copying the map only when one of them mints or minted.
func (ix *index) noteMinters(recs []store.Record) {
	old := ix.minters.Load()
	var next map[string]minter
	for i := range recs {
		r := &recs[i]
		mints := len(r.Mint) > 0 && r.Revoked.IsZero()
		if !mints && !isMinter(old, r.ID) {
			continue
		}
		if next == nil {
			next = make(map[string]minter)
			if old != nil {
				maps.Copy(next, *old)
			}
		}
		if mints {
			next[r.ID] = minter{tier: r.Tier, mint: r.Mint, expires: store.Millis(r.Expires)}
		} else {
			delete(next, r.ID)
		}
	}
	if next != nil {
		ix.minters.Store(&next)
	}
}

// isMinter reports whether id is in m.
func isMinter(m *map[string]minter, id string) bool {
	if m == nil {
		return false
	}
	_, ok := (*m)[id]
	return ok
}

// settingsOf returns the settings of the live key id, or nil when it has
// none. It takes no lock and allocates nothing.
func (ix *index) settingsOf(id string) *policy.Settings {
	if m := ix.settings.Load(); m != nil {
		return (*m)[id]
	}
	return nil
}

// noteSettings brings the settings up to date with recs, changed in that
// order, copying the map only when one of them has or had settings. A
// key's settings get a new pointer whenever they change, and keep theirs
// otherwise (a rotation): callers cache by it.
func (ix *index) noteSettings(recs []store.Record) {
	old := ix.settings.Load()
	var next map[string]*policy.Settings
	for i := range recs {
		r := &recs[i]
		cur := ix.settingsOf(r.ID)
		if next != nil {
			cur = next[r.ID]
		}
		has := !r.Settings.IsZero() && r.Revoked.IsZero()
		if !has && cur == nil || has && cur != nil && reflect.DeepEqual(*cur, r.Settings) {
			continue
		}
		if next == nil {
			next = make(map[string]*policy.Settings)
			if old != nil {
				maps.Copy(next, *old)
			}
		}
		if has {
			s := r.Settings
			next[r.ID] = &s
		} else {
			delete(next, r.ID)
		}
	}
	switch {
	case next == nil:
	case len(next) == 0:
		ix.settings.Store(nil)
	default:
		ix.settings.Store(&next)
	}
}

// emptyView is the view of an index never written to. Nothing writes to
// it: the first write rebuilds.
var emptyView view

// view returns the current view, never nil.
func (ix *index) view() *view {
	if v := ix.cur.Load(); v != nil {
		return v
	}
	return &emptyView
}

// apply brings the index up to date with records changed in the store,
// in the order of their changes. It returns the IDs of the records it
// could not hold (an ID over 255 bytes, too many tiers or keys).
func (ix *index) apply(recs []store.Record) (skipped []string) {
	ix.mu.Lock()
	defer ix.mu.Unlock()
	ix.noteMinters(recs)
	ix.noteSettings(recs)
	for i := range recs {
		r := &recs[i]
		if !r.Revoked.IsZero() {
			if pos, idx, ok := ix.findID(r.ID); ok {
				ix.remove(pos, idx)
			}
			continue
		}
		ix.reserve(1)
		tier, ok := ix.admit(r)
		if !ok || len(ix.view().entries) == cap(ix.view().entries) {
			skipped = append(skipped, r.ID)
			continue
		}
		ix.put(r, tier)
	}
	return skipped
}

// loadNew adds records to an index that holds none of their IDs, such as
// every key of one snapshot of a store: nothing is looked up by ID, and
// the batch is published at once. Revoked records are skipped. It
// returns the IDs of the records it could not hold.
func (ix *index) loadNew(recs []store.Record) (skipped []string) {
	ix.mu.Lock()
	defer ix.mu.Unlock()
	ix.noteMinters(recs)
	ix.noteSettings(recs)
	ix.reserve(len(recs))
	v := ix.view()
	entries := v.entries
	for i := range recs {
		r := &recs[i]
		if !r.Revoked.IsZero() {
			continue
		}
		tier, ok := ix.admit(r)
		if !ok || len(entries) == cap(entries) {
			skipped = append(skipped, r.ID)
			continue
		}
		entries = entries[:len(entries)+1]
		fill(&entries[len(entries)-1], r, tier, ix.texts.add(r.ID, r.Name), unixSeconds(r.LastUsed))
	}
	// Publish the entries before any slot points at them.
	nv := &view{slots: v.slots, entries: entries, tiers: ix.tiers}
	ix.cur.Store(nv)
	for i := len(v.entries); i < len(entries); i++ {
		nv.insert(&entries[i].hash, uint32(i))
		ix.insertID(entries[i].id(), uint32(i))
	}
	ix.live += len(entries) - len(v.entries)
	return skipped
}

// admit returns the position of r's tier, or false when an entry cannot
// hold r.
func (ix *index) admit(r *store.Record) (uint16, bool) {
	if len(r.ID) > maxIndexedIDLen {
		return 0, false
	}
	return ix.tierIndex(r.Tier)
}

// fill sets up the new entry e for r.
func fill(e *entry, r *store.Record, tier uint16, text string, lastUsed uint32) {
	e.hash = r.Hash
	e.text = text
	e.expires = store.Millis(r.Expires)
	e.tier = tier
	e.idLen = uint8(len(r.ID))
	e.lastUsed.Store(lastUsed)
}

// put adds or replaces the entry of r, which has room.
func (ix *index) put(r *store.Record, tier uint16) {
	v := ix.view()
	pos, idx, found := ix.findID(r.ID)
	var old *entry
	text, last := "", unixSeconds(r.LastUsed)
	if found {
		old = &v.entries[idx]
		if old.hash == r.Hash && old.expires == store.Millis(r.Expires) && old.tier == tier && old.name() == r.Name {
			return
		}
		if old.name() == r.Name {
			text = old.text
		}
		last = max(last, old.lastUsed.Load())
	}
	if text == "" {
		text = ix.texts.add(r.ID, r.Name)
	}
	n := len(v.entries)
	entries := v.entries[:n+1]
	e := &entries[n]
	fill(e, r, tier, text, last)
	// Publish the entry before any slot points at it.
	v = &view{slots: v.slots, entries: entries, tiers: ix.tiers}
	ix.cur.Store(v)

	idx32 := uint32(n)
	switch {
	case old == nil:
		v.insert(&e.hash, idx32)
		ix.insertID(r.ID, idx32)
		ix.live++
		return
	case old.hash == e.hash:
		if s := v.slotOf(&old.hash, idx); s >= 0 {
			v.slots[s].Store(fingerprint(&e.hash) | uint64(idx32+1))
		}
	default:
		// The new secret works before the old one stops: a request
		// racing a rotation is served by one or the other.
		v.insert(&e.hash, idx32)
		if s := v.slotOf(&old.hash, idx); s >= 0 {
			v.slots[s].Store(tombstone)
		}
	}
	ix.ids[pos] = idx32 + 1
}

// remove drops entry idx, found at pos in ids.
func (ix *index) remove(pos int, idx uint32) {
	v := ix.view()
	if s := v.slotOf(&v.entries[idx].hash, idx); s >= 0 {
		v.slots[s].Store(tombstone)
	}
	ix.ids[pos] = tombstone
	ix.live--
}

// size returns the number of live keys.
func (ix *index) size() int {
	ix.mu.Lock()
	defer ix.mu.Unlock()
	return ix.live
}

// clear empties the index and lets its memory go.
func (ix *index) clear() {
	ix.mu.Lock()
	defer ix.mu.Unlock()
	ix.cur.Store(&emptyView)
	ix.minters.Store(nil)
	ix.settings.Store(nil)
	ix.ids, ix.tiers, ix.tierN, ix.texts, ix.live = nil, nil, nil, textArena{}, 0
}

// trim gives back room that grow made but a load did not use.
func (ix *index) trim() {
	ix.mu.Lock()
	defer ix.mu.Unlock()
	if want := ix.live + headroom(ix.live); cap(ix.view().entries) > want {
		ix.rebuild(want)
	}
}

// headroom is how many entries a rebuild leaves room for beyond live
// ones, bounding both the memory left unused and how often a steady
// stream of changes rebuilds.
func headroom(live int) int { return live/16 + 1024 }

// reserve makes room for k more entries, rebuilding when the current
// view is full (of live or dead entries).
func (ix *index) reserve(k int) {
	v := ix.view()
	if len(v.entries)+k <= cap(v.entries) {
		return
	}
	want := ix.live + k
	ix.rebuild(min(want+headroom(want), maxEntries))
}

// grow makes room for n more entries at once, before a first load.
func (ix *index) grow(n int) {
	ix.mu.Lock()
	defer ix.mu.Unlock()
	ix.reserve(n)
}

// rebuild publishes a new view with the live entries and room for
// capacity in all, dropping dead entries and their text.
func (ix *index) rebuild(capacity int) {
	old := ix.view()
	// At most three quarters of the slots are ever used, live or dead,
	// which keeps probes short and always leaves an empty slot.
	nv := &view{
		slots:   make([]atomic.Uint64, capacity+capacity/3+1),
		entries: make([]entry, 0, capacity),
		tiers:   ix.tiers,
	}
	oldIDs := ix.ids
	ix.ids = make([]uint32, len(nv.slots))
	if ix.seed == (maphash.Seed{}) {
		ix.seed = maphash.MakeSeed()
	}
	ix.texts = textArena{}
	for _, s := range oldIDs {
		if s == 0 || s == tombstone {
			continue
		}
		o := &old.entries[s-1]
		n := len(nv.entries)
		nv.entries = nv.entries[:n+1]
		e := &nv.entries[n]
		e.hash, e.expires, e.tier, e.idLen = o.hash, o.expires, o.tier, o.idLen
		e.text = ix.texts.add(o.text, "")
		e.lastUsed.Store(o.lastUsed.Load())
		nv.insert(&e.hash, uint32(n))
		ix.insertID(e.id(), uint32(n))
	}
	ix.cur.Store(nv)
}

// findID returns the position in ids and the index of the entry of the
// key id.
func (ix *index) findID(id string) (pos int, idx uint32, ok bool) {
	n := len(ix.ids)
	if n == 0 {
		return 0, 0, false
	}
	entries := ix.view().entries
	for i := ix.idHome(id); ; {
		s := ix.ids[i]
		if s == 0 {
			return 0, 0, false
		}
		if s != tombstone && entries[s-1].id() == id {
			return i, s - 1, true
		}
		if i++; i == n {
			i = 0
		}
	}
}

// idHome is the first slot of ids to probe for id.
func (ix *index) idHome(id string) int {
	hi, _ := bits.Mul64(maphash.String(ix.seed, id), uint64(len(ix.ids)))
	return int(hi)
}

// insertID records that entry idx holds the key id.
func (ix *index) insertID(id string, idx uint32) {
	n := len(ix.ids)
	for i := ix.idHome(id); ; {
		if s := ix.ids[i]; s == 0 || s == tombstone {
			ix.ids[i] = idx + 1
			return
		}
		if i++; i == n {
			i = 0
		}
	}
}

// tierIndex returns the position of tier in tiers, adding it when new.
func (ix *index) tierIndex(tier string) (uint16, bool) {
	if i, ok := ix.tierN[tier]; ok {
		return i, true
	}
	if len(ix.tiers) == maxTiers {
		return 0, false
	}
	if ix.tierN == nil {
		ix.tierN = make(map[string]uint16)
	}
	tier = strings.Clone(tier)
	ix.tierN[tier] = uint16(len(ix.tiers))
	ix.tiers = append(ix.tiers, tier)
	return uint16(len(ix.tiers) - 1), true
}

// tierCounts returns the number of keys per tier that are live and not
// expired at now.
func (ix *index) tierCounts(now time.Time) map[string]int {
	ix.mu.Lock()
	defer ix.mu.Unlock()
	v := ix.view()
	nowMS := now.UnixMilli()
	counts := make(map[string]int)
	for _, s := range ix.ids {
		if s == 0 || s == tombstone {
			continue
		}
		if e := &v.entries[s-1]; e.expires == 0 || nowMS < e.expires {
			counts[v.tiers[e.tier]]++
		}
	}
	return counts
}

// unixSeconds is t as a lastUsed value, 0 for the zero time.
func unixSeconds(t time.Time) uint32 {
	if t.IsZero() {
		return 0
	}
	return uint32(min(max(t.Unix(), 0), math.MaxUint32))
}

// textArena packs short strings into large shared ones, saving an
// allocation (and its size-class rounding) per key. The strings it
// returns stay valid: a strings.Builder never rewrites what it holds.
type textArena struct {
	b strings.Builder
}

const arenaChunk = 64 << 10

// add returns s1+s2, stored in the arena.
func (a *textArena) add(s1, s2 string) string {
	n := len(s1) + len(s2)
	if a.b.Cap()-a.b.Len() < n {
		a.b = strings.Builder{}
		a.b.Grow(max(arenaChunk, n))
	}
	off := a.b.Len()
	a.b.WriteString(s1)
	a.b.WriteString(s2)
	return a.b.String()[off:]
}
