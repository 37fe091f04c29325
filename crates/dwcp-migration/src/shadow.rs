//! What the destination holds, page by page, as this source sent it: the bases that edited
//! pages travel as XOR deltas against.
//!
//! A copy of every page sent would double the VM in memory at the source. The shadow keeps
//! at most a budget of page contents instead, and lets the others go by CLOCK, the usual
//! approximation of least-recently-used: a page sent again since the clock's hand last
//! passed it gets another turn. A workload's hot pages are sent round after round, so they
//! stay, and round 0's pages that are never written again leave first. A page without a
//! kept base is encoded as any new page is (zero, duplicate, the destination's cache,
//! compressed literal), so a smaller shadow costs bytes on the wire, never correctness.
//! Zero pages take no slot: that the destination holds zeros there is one marker.

/// No content kept for the page.
const NONE: u32 = u32::MAX;
/// The destination holds a zero page there.
const ZERO: u32 = u32::MAX - 1;
/// `addr_of` of a slot given up.
const FREED: u64 = u64::MAX;
/// Most slots: below the markers.
const MAX_SLOTS: u64 = (u32::MAX - 2) as u64;

#[derive(Debug)]
pub(crate) struct Shadow {
    page_size: usize,
    /// For each page: its slot, [`NONE`] or [`ZERO`].
    slot_of: Vec<u32>,
    /// For each slot: its page.
    addr_of: Vec<u64>,
    /// For each slot: sent again since the hand last passed.
    used: Vec<bool>,
    /// Slot contents, `page_size` bytes each.
    data: Vec<u8>,
    capacity: usize,
    hand: usize,
    /// Slots given up by pages that became zero, taken again before any other.
    free: Vec<u32>,
    zero: Vec<u8>,
}

impl Shadow {
    /// A shadow of a VM of `pages` pages keeping at most `budget` bytes of page contents
    /// (`u64::MAX`: every page).
    pub(crate) fn new(pages: u64, page_size: usize, budget: u64) -> Self {
        let capacity = (budget / page_size.max(1) as u64).min(pages).min(MAX_SLOTS) as usize;
        // Reserved once, so that growing never copies (nor, for a moment, doubles) what is
        // held; only the pages written are ever resident.
        let mut data = Vec::new();
        data.reserve_exact(capacity * page_size);
        Self {
            page_size,
            slot_of: vec![NONE; pages as usize],
            addr_of: Vec::new(),
            used: Vec::new(),
            data,
            capacity,
            hand: 0,
            free: Vec::new(),
            zero: vec![0; page_size],
        }
    }

    /// Left behind while the real one is away on the encoding thread.
    pub(crate) fn empty() -> Self {
        Self::new(0, 4096, 0)
    }

    /// What the destination holds at `addr`, if known.
    pub(crate) fn base(&self, addr: u64) -> Option<&[u8]> {
        match *self.slot_of.get(addr as usize)? {
            NONE => None,
            ZERO => Some(&self.zero),
            slot => {
                let at = slot as usize * self.page_size;
                self.data.get(at..at + self.page_size)
            }
        }
    }

    /// `page` was sent for `addr`: the destination holds it now.
    pub(crate) fn record(&mut self, addr: u64, page: &[u8]) {
        let ps = self.page_size;
        let Some(&cur) = self.slot_of.get(addr as usize) else {
            return;
        };
        if page.len() != ps {
            // Not a page: whatever was known of the address is not any more.
            if cur != NONE && cur != ZERO {
                self.release(cur as usize);
            }
            self.slot_of[addr as usize] = NONE;
            return;
        }
        if dwcp_encoding::is_zero(page) {
            if cur != NONE && cur != ZERO {
                self.release(cur as usize);
            }
            self.slot_of[addr as usize] = ZERO;
            return;
        }
        let slot = if cur != NONE && cur != ZERO {
            self.used[cur as usize] = true;
            cur as usize
        } else if let Some(slot) = self.free.pop() {
            let slot = slot as usize;
            self.addr_of[slot] = addr;
            self.used[slot] = false;
            slot
        } else if self.addr_of.len() < self.capacity {
            self.addr_of.push(addr);
            self.used.push(false);
            self.data.resize(self.data.len() + ps, 0);
            self.addr_of.len() - 1
        } else if let Some(slot) = self.victim() {
            // Free slots are taken before the hand runs, so a victim holds a page.
            let old = self.addr_of[slot];
            if self.slot_of.get(old as usize) == Some(&(slot as u32)) {
                self.slot_of[old as usize] = NONE;
            }
            self.addr_of[slot] = addr;
            self.used[slot] = false;
            slot
        } else {
            // No budget at all.
            self.slot_of[addr as usize] = NONE;
            return;
        };
        self.slot_of[addr as usize] = slot as u32;
        self.data[slot * ps..(slot + 1) * ps].copy_from_slice(page);
    }

    /// Pages whose content is kept (zero pages not counted).
    #[cfg(test)]
    pub(crate) fn kept(&self) -> usize {
        self.addr_of.len() - self.free.len()
    }

    /// Bytes of page contents held.
    pub(crate) fn bytes(&self) -> usize {
        (self.addr_of.len() - self.free.len()) * self.page_size
    }

    /// The slot's page keeps no content any more; the next page to need a slot takes it.
    fn release(&mut self, slot: usize) {
        self.used[slot] = false;
        self.addr_of[slot] = FREED;
        self.free.push(slot as u32);
    }

    /// The slot the hand gives away: the first one not used since it last passed. Two
    /// sweeps at most, since the first clears every mark it passes. (No slot is free when
    /// it runs: those are taken first.)
    fn victim(&mut self) -> Option<usize> {
        let n = self.addr_of.len();
        if n == 0 {
            return None;
        }
        for _ in 0..2 * n {
            let h = self.hand % n;
            self.hand = (h + 1) % n;
            if self.used[h] {
                self.used[h] = false;
            } else if self.addr_of[h] != FREED {
                return Some(h);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(b: u8) -> Vec<u8> {
        let mut p = vec![b; 4096];
        p[0] = 1;
        p
    }

    #[test]
    fn an_unbounded_shadow_keeps_every_page_sent_last() {
        let mut s = Shadow::new(16, 4096, u64::MAX);
        assert!(s.base(3).is_none(), "nothing sent yet");
        s.record(3, &page(7));
        s.record(3, &page(8));
        assert_eq!(s.base(3), Some(&page(8)[..]));
        s.record(4, &[0; 4096]);
        assert_eq!(s.base(4), Some(&[0u8; 4096][..]));
        assert_eq!(s.kept(), 1, "a zero page takes no slot");
        // A page that was content and is zero now gives its slot up, and back.
        s.record(3, &[0; 4096]);
        assert_eq!(s.base(3), Some(&[0u8; 4096][..]));
        assert_eq!(s.kept(), 0);
        s.record(5, &page(9));
        assert_eq!(s.base(5), Some(&page(9)[..]));
        assert!(s.base(99).is_none(), "out of range is unknown, not a panic");
        s.record(99, &page(1));
        s.record(6, &page(4));
        s.record(6, &[1; 17]);
        assert!(
            s.base(6).is_none(),
            "a short page is not kept, nor the one before it"
        );
    }

    #[test]
    fn a_slot_given_up_by_a_page_that_became_zero_is_taken_before_any_page_is_evicted() {
        // Room for 3 pages.
        let mut s = Shadow::new(64, 4096, 3 * 4096);
        for a in 0..3 {
            s.record(a, &page(a as u8 + 10));
        }
        s.record(1, &[0; 4096]);
        assert_eq!((s.kept(), s.bytes()), (2, 2 * 4096));
        // A new page takes page 1's slot: 0 and 2 stay.
        s.record(7, &page(70));
        assert_eq!(s.base(0), Some(&page(10)[..]));
        assert_eq!(s.base(2), Some(&page(12)[..]));
        assert_eq!(s.base(7), Some(&page(70)[..]));
        assert_eq!(s.base(1), Some(&[0u8; 4096][..]));
        assert_eq!(s.kept(), 3);
        // Full again: the next one evicts, and what is kept is still right.
        s.record(1, &page(11));
        assert_eq!(s.kept(), 3);
        for a in [0, 1, 2, 7] {
            if let Some(b) = s.base(a) {
                let want = match a {
                    7 => page(70),
                    a => page(a as u8 + 10),
                };
                assert_eq!(b, &want[..], "page {a}");
            }
        }
        assert_eq!(s.base(1), Some(&page(11)[..]));
        // Unbounded: every page written stays, through zero and back.
        let mut all = Shadow::new(8, 4096, u64::MAX);
        for round in 0..4u8 {
            for a in 0..8 {
                if (a + u64::from(round)) % 3 == 0 {
                    all.record(a, &[0; 4096]);
                } else {
                    all.record(a, &page(round * 8 + a as u8));
                }
            }
        }
        for a in 0..8u64 {
            let want = if (a + 3) % 3 == 0 {
                vec![0; 4096]
            } else {
                page(24 + a as u8)
            };
            assert_eq!(all.base(a), Some(&want[..]), "page {a}");
        }
    }

    #[test]
    fn a_bounded_shadow_keeps_the_pages_sent_again_and_lets_the_others_go() {
        // Room for 4 pages. Round 0 sends 0..8; round 1 sends 2 and 3 again (hot).
        let mut s = Shadow::new(64, 4096, 4 * 4096);
        for a in 0..8 {
            s.record(a, &page(a as u8 + 10));
        }
        assert_eq!(s.kept(), 4);
        assert_eq!(s.bytes(), 4 * 4096);
        // What is kept is always right for its page.
        for a in 0..8 {
            if let Some(b) = s.base(a) {
                assert_eq!(b, &page(a as u8 + 10)[..]);
            }
        }
        for round in 0..3u8 {
            s.record(2, &page(50 + round));
            s.record(3, &page(60 + round));
            // Cold pages pass by, one each round.
            s.record(20 + u64::from(round), &page(70 + round));
            s.record(30 + u64::from(round), &page(80 + round));
        }
        assert_eq!(s.base(2), Some(&page(52)[..]), "hot pages stay");
        assert_eq!(s.base(3), Some(&page(62)[..]));
        assert_eq!(s.kept(), 4);
        let held = (0..64).filter(|&a| s.base(a).is_some()).count();
        assert_eq!(held, 4);
    }

    #[test]
    fn a_shadow_without_budget_knows_only_zero_pages() {
        let mut s = Shadow::new(8, 4096, 0);
        s.record(1, &page(3));
        assert!(s.base(1).is_none());
        s.record(2, &[0; 4096]);
        assert!(s.base(2).is_some());
        assert_eq!(s.bytes(), 0);
        let e = Shadow::empty();
        assert!(e.base(0).is_none());
    }
}
