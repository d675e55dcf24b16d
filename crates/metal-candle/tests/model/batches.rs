//! KV-cache decoding, padded batches and packed batches give the logits of plain forwards.

use candle_core::{DType, Device, IndexOp, Tensor};
use metal_candle::model::load::load_hf_dir;
use metal_candle::model::{Architecture, Llama, SequenceLayout};

use crate::common::{batch, ids, max_diff, random_hf_dir, tiny_config};

const TOL: f32 = 1e-4;

fn model(arch: Architecture, seed: u64) -> (tempfile::TempDir, Llama) {
    let (dir, _) = random_hf_dir(&tiny_config(arch, 2, false), seed);
    let m = load_hf_dir(dir.path(), DType::F32, &Device::Cpu).unwrap();
    (dir, m)
}

/// Logits (seq, vocab) of one unpadded sequence.
fn single(m: &Llama, tokens: &[u32]) -> Tensor {
    m.forward(&ids(tokens), 0, None)
        .unwrap()
        .squeeze(0)
        .unwrap()
}

#[test]
fn kv_cache_decode_equals_full_forward() {
    for arch in [Architecture::Llama, Architecture::Qwen2] {
        let (_dir, m) = model(arch, 10);
        let tokens = [3u32, 14, 15, 9, 26, 53, 58, 9, 7, 11];
        let full = single(&m, &tokens);
        let mut cache = m.new_cache();
        let prefill = m
            .forward(&ids(&tokens[..4]), 0, Some(&mut cache))
            .unwrap()
            .squeeze(0)
            .unwrap();
        assert!(max_diff(&prefill, &full.i(..4).unwrap()) < TOL);
        // One token at a time, then a chunk of three (speculative-style), then one more.
        for pos in 4..6 {
            let step = m
                .forward(&ids(&tokens[pos..pos + 1]), cache.len(), Some(&mut cache))
                .unwrap();
            let d = max_diff(
                &step.squeeze(0).unwrap().squeeze(0).unwrap(),
                &full.i(pos).unwrap(),
            );
            assert!(d < TOL, "{arch:?} decode at {pos}: {d}");
        }
        let chunk = m
            .forward(&ids(&tokens[6..9]), 6, Some(&mut cache))
            .unwrap()
            .squeeze(0)
            .unwrap();
        assert!(
            max_diff(&chunk, &full.i(6..9).unwrap()) < TOL,
            "{arch:?} chunked decode"
        );
        let last = m
            .forward_last(
                &ids(&tokens[9..]),
                &SequenceLayout::Contiguous { offset: 9 },
                Some(&mut cache),
            )
            .unwrap();
        assert!(max_diff(&last.squeeze(0).unwrap(), &full.i(9).unwrap()) < TOL);
        assert_eq!(cache.len(), 10);
    }
}

#[test]
fn wrong_offset_is_an_error() {
    let (_dir, m) = model(Architecture::Llama, 11);
    let mut cache = m.new_cache();
    m.forward(&ids(&[1, 2, 3]), 0, Some(&mut cache)).unwrap();
    let err = m
        .forward(&ids(&[4]), 2, Some(&mut cache))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("seqlen_offset is 2") && err.contains("3 tokens"),
        "{err}"
    );
}

#[test]
fn padded_rows_equal_unpadded_sequences() {
    let (_dir, m) = model(Architecture::Llama, 12);
    let a = [5u32, 9, 13, 2, 40, 41, 7];
    let b = [33u32, 21, 8, 19];
    let (la, lb) = (single(&m, &a), single(&m, &b));
    let pad = 0u32;
    // Left padding (generation style) and right padding (training style).
    for left in [true, false] {
        let mut row_b = vec![pad; 3];
        let mut mask_b = vec![0u32; 3];
        if left {
            row_b.extend_from_slice(&b);
            mask_b.splice(0..0, [1u32; 4]);
            mask_b.rotate_left(4);
        } else {
            row_b.splice(0..0, b);
            mask_b.splice(0..0, [1u32; 4]);
        }
        let input = batch(&[a.to_vec(), row_b.clone()]);
        let mask = batch(&[vec![1u32; 7], mask_b.clone()]);
        let logits = m
            .forward_with_layout(
                &input,
                &SequenceLayout::Padded {
                    attention_mask: mask,
                },
                None,
            )
            .unwrap();
        assert!(
            max_diff(&logits.i(0).unwrap(), &la) < TOL,
            "row a (left = {left})"
        );
        let start = if left { 3 } else { 0 };
        let got_b = logits.i(1).unwrap().i(start..start + 4).unwrap();
        let d = max_diff(&got_b, &lb);
        assert!(d < TOL, "padded row b (left = {left}): {d}");
        assert!(
            logits
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .all(|v| v.is_finite()),
            "NaN on padding rows"
        );
    }
}

#[test]
fn left_padded_batch_decodes_with_cache() {
    let (_dir, m) = model(Architecture::Qwen2, 13);
    let a = [5u32, 9, 13, 2, 40];
    let b = [33u32, 21];
    let next = [[17u32], [29u32]];
    let full_a = single(&m, &[&a[..], &next[0]].concat());
    let full_b = single(&m, &[&b[..], &next[1]].concat());
    let input = batch(&[a.to_vec(), vec![0, 0, 0, 33, 21]]);
    let mut mask = vec![vec![1u32; 5], vec![0, 0, 0, 1, 1]];
    let mut cache = m.new_cache();
    let layout = SequenceLayout::Padded {
        attention_mask: batch(&mask),
    };
    m.forward_with_layout(&input, &layout, Some(&mut cache))
        .unwrap();
    mask.iter_mut().for_each(|row| row.push(1));
    let layout = SequenceLayout::Padded {
        attention_mask: batch(&mask),
    };
    let step = m
        .forward_last(
            &Tensor::new(&next, &Device::Cpu).unwrap(),
            &layout,
            Some(&mut cache),
        )
        .unwrap();
    assert!(max_diff(&step.i(0).unwrap(), &full_a.i(5).unwrap()) < TOL);
    assert!(max_diff(&step.i(1).unwrap(), &full_b.i(2).unwrap()) < TOL);
}

#[test]
fn packed_rows_equal_separate_sequences() {
    let (_dir, m) = model(Architecture::Llama, 14);
    let seqs: [&[u32]; 3] = [&[5, 9, 13, 2, 40], &[33, 21, 8, 19], &[7, 7, 7]];
    let tokens: Vec<u32> = seqs.concat();
    let segments: Vec<u32> = seqs
        .iter()
        .enumerate()
        .flat_map(|(i, s)| std::iter::repeat_n(i as u32, s.len()))
        .collect();
    // Two rows: the packed one, and the same packing in another order.
    let order2: Vec<u32> = [seqs[2], seqs[0], seqs[1]].concat();
    let seg2: Vec<u32> = [vec![0u32; 3], vec![1; 5], vec![2; 4]].concat();
    let input = batch(&[tokens, order2]);
    let segment_ids = batch(&[segments, seg2]);
    let logits = m
        .forward_train(&input, &SequenceLayout::Packed { segment_ids })
        .unwrap();
    let mut start = 0;
    for s in seqs {
        let d = max_diff(
            &logits.i(0).unwrap().i(start..start + s.len()).unwrap(),
            &single(&m, s),
        );
        assert!(d < TOL, "packed sequence at {start}: {d}");
        start += s.len();
    }
    let d = max_diff(&logits.i(1).unwrap().i(3..8).unwrap(), &single(&m, seqs[0]));
    assert!(d < TOL, "second row: {d}");
}

#[test]
fn packed_batch_with_cache_is_rejected() {
    let (_dir, m) = model(Architecture::Llama, 15);
    let mut cache = m.new_cache();
    m.forward(&ids(&[1, 2]), 0, Some(&mut cache)).unwrap();
    let layout = SequenceLayout::Packed {
        segment_ids: Tensor::new(&[[0u32, 0]], &Device::Cpu).unwrap(),
    };
    assert!(m
        .forward_with_layout(&ids(&[3, 4]), &layout, Some(&mut cache))
        .is_err());
}

#[test]
fn out_of_vocabulary_token_is_an_error() {
    let (_dir, m) = model(Architecture::Llama, 16);
    let err = m.forward(&ids(&[1, 61]), 0, None).unwrap_err().to_string();
    assert!(err.contains("61") && err.contains("vocabulary"), "{err}");
}
