//! The process's allocator: mimalloc, asked the way C asks it.
//!
//! The `mimalloc` crate's `GlobalAlloc` passes every request to `mi_malloc_aligned`, whatever
//! its alignment. In mimalloc v3 that call takes a fast path only when the size class already
//! has a page with a free block at a suitably aligned address; otherwise it over-allocates by
//! `alignment - 1` bytes, into the next size class, and marks the page as holding interior
//! pointers (microsoft/mimalloc#889). Under Aisle's request path that was a quarter of all
//! allocations (23 over-allocations a proxied request; issue 16: 4k of a pass's 118k
//! instructions, 1.5k of a memory hit's 50k), and a thread's first 192-byte `Arc<Entry>`s
//! (16-aligned) took 224-byte blocks.
//!
//! mimalloc places every block of 16 bytes or more at a 16-byte boundary and every block at an
//! 8-byte one (its `MI_ALIGN2W` size classes: `alloc.c` asserts it of every block it hands out),
//! as C's `malloc` must for `max_align_t`. So a request whose alignment is at most 16 and at
//! most its size is served by `mi_malloc`, `mi_zalloc` and `mi_realloc`, the rule Rust's own
//! `System` allocator follows for `malloc`; anything else keeps the aligned calls. A test
//! checks alignment and usable size over every small layout.

use libmimalloc_sys as mi;
use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

/// What plain `mi_malloc` guarantees (`MI_MAX_ALIGN_SIZE`), for blocks at least that large.
const MIN_ALIGN: usize = 16;

/// mimalloc as the global allocator (`src/main.rs`; the memory benchmarks count through it).
pub struct Allocator;

/// Whether plain `mi_malloc` of `size` bytes is aligned enough for `align`.
#[inline(always)]
fn plain(align: usize, size: usize) -> bool {
    align <= MIN_ALIGN && align <= size
}

/// Debug builds (the `aisle` the integration tests run) check every plain answer's alignment,
/// so a mimalloc that stopped keeping its layout would stop the test suite. An allocator may
/// not unwind, so it aborts, after a message written without allocating.
#[inline(always)]
fn checked(p: *mut u8, align: usize) -> *mut u8 {
    if cfg!(debug_assertions) && !(p as usize).is_multiple_of(align) {
        use std::io::Write;
        let _ = std::io::stderr().write_all(b"aisle: mimalloc returned a misaligned block\n");
        std::process::abort();
    }
    p
}

// SAFETY: every pointer handed out comes from mimalloc and is freed or resized by mimalloc;
// `plain` picks the unaligned calls only where mimalloc's own block layout meets the alignment.
unsafe impl GlobalAlloc for Allocator {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if plain(layout.align(), layout.size()) {
            checked(
                unsafe { mi::mi_malloc(layout.size()) as *mut u8 },
                layout.align(),
            )
        } else {
            unsafe { mi::mi_malloc_aligned(layout.size(), layout.align()) as *mut u8 }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if plain(layout.align(), layout.size()) {
            checked(
                unsafe { mi::mi_zalloc(layout.size()) as *mut u8 },
                layout.align(),
            )
        } else {
            unsafe { mi::mi_zalloc_aligned(layout.size(), layout.align()) as *mut u8 }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        unsafe { mi::mi_free(ptr as *mut c_void) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if plain(layout.align(), new_size) {
            let p = unsafe { mi::mi_realloc(ptr as *mut c_void, new_size) as *mut u8 };
            checked(p, layout.align())
        } else {
            unsafe {
                mi::mi_realloc_aligned(ptr as *mut c_void, new_size, layout.align()) as *mut u8
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    unsafe extern "C" {
        // In mimalloc's C library; `libmimalloc-sys` declares it only with its `extended`
        // feature.
        fn mi_usable_size(p: *const c_void) -> usize;
    }

    fn usable(p: *mut u8) -> usize {
        unsafe { mi_usable_size(p as *const c_void) }
    }

    /// Every layout up to 4 KiB and alignment up to 4 KiB: aligned, writable, zeroed when
    /// asked, and its bytes kept by a `realloc` that grows or shrinks it.
    #[test]
    fn every_small_layout_is_aligned_and_kept() {
        let a = Allocator;
        let mut align = 1;
        while align <= 4096 {
            for size in (1..=4096usize).filter(|s| *s < 64 || s % 7 == 0 || s.is_power_of_two()) {
                let layout = Layout::from_size_align(size, align).unwrap();
                unsafe {
                    let p = a.alloc(layout);
                    assert!(!p.is_null());
                    assert_eq!(p as usize % align, 0, "size {size} align {align}");
                    assert!(usable(p) >= size);
                    std::ptr::write_bytes(p, 0xA5, size);
                    let z = a.alloc_zeroed(layout);
                    assert_eq!(z as usize % align, 0, "zeroed: size {size} align {align}");
                    assert!(std::slice::from_raw_parts(z, size).iter().all(|b| *b == 0));
                    a.dealloc(z, layout);
                    for new_size in [size / 2 + 1, size * 3] {
                        let q = a.alloc(layout);
                        std::ptr::write_bytes(q, 0x5A, size);
                        let r = a.realloc(q, layout, new_size);
                        assert_eq!(
                            r as usize % align,
                            0,
                            "realloc {size}->{new_size} align {align}"
                        );
                        let kept = std::slice::from_raw_parts(r, size.min(new_size));
                        assert!(kept.iter().all(|b| *b == 0x5A));
                        a.dealloc(r, Layout::from_size_align(new_size, align).unwrap());
                    }
                    assert!(std::slice::from_raw_parts(p, size)
                        .iter()
                        .all(|b| *b == 0xA5));
                    a.dealloc(p, layout);
                }
            }
            align *= 2;
        }
    }

    /// An `Arc<Entry>`'s shape (192 bytes, 16-aligned), allocated on a thread with no pages
    /// yet: each takes a block of its own size class. Through `mi_malloc_aligned` (the
    /// `mimalloc` crate's `GlobalAlloc`) the first of a class finds no page, is over-allocated
    /// into the 224-byte class, and so does every later one.
    #[test]
    fn a_sixteen_aligned_request_takes_its_own_size_class() {
        std::thread::spawn(|| {
            let a = Allocator;
            let layout = Layout::from_size_align(192, 16).unwrap();
            let held: Vec<*mut u8> = (0..1000).map(|_| unsafe { a.alloc(layout) }).collect();
            let sizes: Vec<usize> = held.iter().map(|p| usable(*p)).collect();
            for p in held {
                unsafe { a.dealloc(p, layout) };
            }
            assert!(
                sizes.iter().all(|s| *s == 192),
                "usable sizes: {:?}",
                &sizes[..8]
            );
        })
        .join()
        .unwrap();
    }
}
