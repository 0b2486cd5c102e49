//! Dense handle tables with limits (spec/device-abi.md §0.5 and §14).
//!
//! The guest driver uses handles as direct array indexes without bounds checks, so every handle
//! handed out is below the table's limit, and QP handles are never 0. Freed handles are reused
//! lowest-first, which keeps handles dense; stale work for a reused handle is told apart by the
//! generation the device keeps with every object.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// A table of objects addressed by dense `u32` handles in `first..limit`.
#[derive(Debug)]
pub struct HandleTable<T> {
    slots: Vec<Option<T>>,
    free: BinaryHeap<Reverse<u32>>,
    first: u32,
    limit: u32,
    len: usize,
}

impl<T> HandleTable<T> {
    /// A table handing out handles `first..limit`. Memory grows with the highest handle in use,
    /// never beyond `limit` entries.
    pub fn new(first: u32, limit: u32) -> Self {
        HandleTable {
            slots: Vec::new(),
            free: BinaryHeap::new(),
            first,
            limit: limit.max(first),
            len: 0,
        }
    }

    /// Stores `value` under the lowest free handle; `None` (and `value` dropped) when full.
    pub fn insert(&mut self, value: T) -> Option<u32> {
        self.insert_with(|_| value)
    }

    /// Like [`insert`](Self::insert), building the value from its handle.
    pub fn insert_with(&mut self, make: impl FnOnce(u32) -> T) -> Option<u32> {
        let handle = match self.free.pop() {
            Some(Reverse(h)) => h,
            None => {
                let next = self
                    .first
                    .checked_add(u32::try_from(self.slots.len()).ok()?)?;
                if next >= self.limit {
                    return None;
                }
                self.slots.push(None);
                next
            }
        };
        let idx = (handle - self.first) as usize;
        self.slots[idx] = Some(make(handle));
        self.len += 1;
        Some(handle)
    }

    /// The handle the next [`insert`](Self::insert) will return, if any.
    pub fn next_handle(&self) -> Option<u32> {
        if let Some(Reverse(h)) = self.free.peek() {
            return Some(*h);
        }
        let next = self
            .first
            .checked_add(u32::try_from(self.slots.len()).ok()?)?;
        (next < self.limit).then_some(next)
    }

    /// Whether another object fits.
    pub fn is_full(&self) -> bool {
        self.free.is_empty()
            && (self.first as u64 + self.slots.len() as u64) >= u64::from(self.limit)
    }

    fn index(&self, handle: u32) -> Option<usize> {
        if handle < self.first || handle >= self.limit {
            return None;
        }
        let idx = (handle - self.first) as usize;
        (idx < self.slots.len()).then_some(idx)
    }

    /// The object under `handle`.
    pub fn get(&self, handle: u32) -> Option<&T> {
        self.index(handle).and_then(|i| self.slots[i].as_ref())
    }

    /// The object under `handle`, mutably.
    pub fn get_mut(&mut self, handle: u32) -> Option<&mut T> {
        self.index(handle).and_then(|i| self.slots[i].as_mut())
    }

    /// Removes and returns the object under `handle`.
    pub fn remove(&mut self, handle: u32) -> Option<T> {
        let i = self.index(handle)?;
        let v = self.slots[i].take()?;
        self.free.push(Reverse(handle));
        self.len -= 1;
        Some(v)
    }

    /// Number of live objects.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Live objects with their handles.
    pub fn iter(&self) -> impl Iterator<Item = (u32, &T)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(move |(i, s)| s.as_ref().map(|v| (self.first + i as u32, v)))
    }

    /// Live objects with their handles, mutably.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (u32, &mut T)> {
        let first = self.first;
        self.slots
            .iter_mut()
            .enumerate()
            .filter_map(move |(i, s)| s.as_mut().map(|v| (first + i as u32, v)))
    }

    /// Removes everything (device RESET).
    pub fn clear(&mut self) {
        self.slots.clear();
        self.free.clear();
        self.len = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_are_dense_bounded_and_reused_lowest_first() {
        let mut t = HandleTable::new(1, 4);
        assert_eq!(t.insert('a'), Some(1));
        assert_eq!(t.insert('b'), Some(2));
        assert_eq!(t.insert('c'), Some(3));
        assert!(t.is_full());
        assert_eq!(t.insert('d'), None, "never a handle at or past the limit");
        assert_eq!(t.remove(2), Some('b'));
        assert_eq!(t.remove(2), None);
        assert_eq!(t.insert('e'), Some(2));
        assert_eq!(t.get(2), Some(&'e'));
        assert_eq!(t.get(0), None, "handle 0 is never valid when first = 1");
        assert_eq!(t.get(4), None);
        assert_eq!(t.get(u32::MAX), None);
        assert_eq!(t.len(), 3);
        t.clear();
        assert!(t.is_empty());
        assert_eq!(t.insert('f'), Some(1));
    }

    #[test]
    fn exhausting_a_table_fails_cleanly() {
        // qemu-reference.md §6.3 hazard 7: the 1025th CREATE_PD must fail, not write past the table.
        let mut t = HandleTable::new(0, 1024);
        for i in 0..1024 {
            assert_eq!(t.insert(i), Some(i));
        }
        assert_eq!(t.insert(1024), None);
        assert_eq!(t.len(), 1024);
    }
}
