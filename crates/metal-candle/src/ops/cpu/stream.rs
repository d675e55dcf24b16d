//! Non-temporal ("streaming") stores for outputs too large to stay in cache.
//!
//! A plain store to a line that is not in cache first reads the line from memory (read for
//! ownership), so an op that reads x and writes y moves three lines per line of output: x, the
//! old y, the new y. Streaming stores write whole lines without reading them, which brings a
//! row op down to the two transfers of a copy (measured on the development VM, 4×512×4096 f32
//! on 2 threads: a max pass plus a scaled store went from ~0.6× to ~1.0× of `memcpy`). They
//! also bypass the caches, which is wrong for a small output the next op is about to read, so
//! they are used only above [`STREAM_MIN_BYTES`].

use std::mem::MaybeUninit;

/// Outputs at least this large are written with streaming stores: well past a core's L2 (1–2
/// MiB on current x86 server cores), where the next op reads them from memory anyway.
pub(crate) const STREAM_MIN_BYTES: usize = 8 << 20;

/// Whether an output of `bytes` bytes is written with streaming stores.
pub(crate) fn should_stream(bytes: usize) -> bool {
    bytes >= STREAM_MIN_BYTES
}

/// Copies `src` into `dst` (equal lengths) with streaming stores on x86-64 (SSE2, every
/// x86-64 CPU has them), with plain stores elsewhere. Call [`fence`] before another thread
/// reads `dst`.
#[inline(always)]
pub(crate) fn copy_streaming<T: Copy>(src: &[T], dst: &mut [MaybeUninit<T>]) {
    assert_eq!(src.len(), dst.len(), "copy_streaming: length mismatch");
    let bytes = std::mem::size_of_val(src);
    let s = src.as_ptr().cast::<u8>();
    let d = dst.as_mut_ptr().cast::<u8>();
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `s` and `d` are valid for `bytes` bytes (equal lengths, asserted) and do not
    // overlap (`dst` is a unique borrow). The head copy makes `d + i` 16-byte aligned, as
    // `_mm_stream_si128` requires; the loads are unaligned loads. Only whole elements are
    // ever split across the head, middle and tail, so every byte of `dst` is written.
    unsafe {
        use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_stream_si128};
        let head = d.align_offset(16).min(bytes);
        std::ptr::copy_nonoverlapping(s, d, head);
        let mut i = head;
        while i + 16 <= bytes {
            let v = _mm_loadu_si128(s.add(i).cast::<__m128i>());
            _mm_stream_si128(d.add(i).cast::<__m128i>(), v);
            i += 16;
        }
        std::ptr::copy_nonoverlapping(s.add(i), d.add(i), bytes - i);
    }
    #[cfg(not(target_arch = "x86_64"))]
    // SAFETY: as above; a plain copy.
    unsafe {
        std::ptr::copy_nonoverlapping(s, d, bytes);
    }
}

/// Orders this thread's streaming stores before whatever it does next (they are weakly
/// ordered): call it once after a block of [`copy_streaming`] calls, before handing the
/// output to other threads.
#[inline(always)]
pub(crate) fn fence() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: SSE2 is part of the x86-64 baseline.
    unsafe {
        std::arch::x86_64::_mm_sfence();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_every_element_at_every_alignment_and_length() {
        for len in [0usize, 1, 2, 3, 7, 8, 9, 31, 33, 1000] {
            let src: Vec<u16> = (0..len as u16 + 8)
                .map(|i| i.wrapping_mul(40_503))
                .collect();
            for offset in 0..8 {
                let mut dst = vec![MaybeUninit::new(0xFFFFu16); len + 8];
                copy_streaming(&src[..len], &mut dst[offset..offset + len]);
                fence();
                // SAFETY: every element was initialised above.
                let got: Vec<u16> = dst.iter().map(|v| unsafe { v.assume_init() }).collect();
                assert_eq!(&got[offset..offset + len], &src[..len], "{len} at {offset}");
                assert!(got[..offset].iter().all(|&v| v == 0xFFFF), "head clobbered");
                assert!(
                    got[offset + len..].iter().all(|&v| v == 0xFFFF),
                    "tail clobbered"
                );
            }
        }
    }
}
