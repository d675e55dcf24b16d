//! Training data: masks, chat templates, packing, batches, bad input.

mod train_common;

use candle_core::{DType, Device};
use metal_candle::train::data::{
    load_examples, pack_rows, split_validation, Batch, ChatTemplate, DataLoader, Example, Message,
};
use train_common::ByteTokenizer;

fn write(dir: &std::path::Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn prompt_completion_trains_on_the_completion_and_eos_only() {
    let dir = train_common::temp_dir("pc");
    let p = write(
        &dir,
        "d.jsonl",
        "{\"prompt\": \"ab\", \"completion\": \"cd\"}\n",
    );
    let (ex, stats) = load_examples(&p, &ByteTokenizer, &ChatTemplate::chatml(), 64).unwrap();
    assert_eq!(
        ex[0].tokens,
        vec![
            b'a' as u32 + 2,
            b'b' as u32 + 2,
            b'c' as u32 + 2,
            b'd' as u32 + 2,
            1
        ]
    );
    assert_eq!(ex[0].trainable, vec![false, false, true, true, true]);
    assert_eq!(stats.trainable_tokens, 3);
}

#[test]
fn text_records_train_on_everything() {
    let dir = train_common::temp_dir("txt");
    let p = write(
        &dir,
        "d.jsonl",
        "{\"text\": \"hey\"}\n\n{\"text\": \"yo\"}\n",
    );
    let (ex, _) = load_examples(&p, &ByteTokenizer, &ChatTemplate::chatml(), 64).unwrap();
    assert_eq!(ex.len(), 2);
    assert!(ex.iter().all(|e| e.trainable.iter().all(|&t| t)));
    assert_eq!(ex[1].tokens.len(), 3);
}

#[test]
fn chat_masks_everything_but_assistant_replies() {
    let t = ChatTemplate::chatml();
    let msgs = vec![
        Message {
            role: "user".into(),
            content: "hi".into(),
        },
        Message {
            role: "assistant".into(),
            content: "yo".into(),
        },
        Message {
            role: "user".into(),
            content: "ok?".into(),
        },
        Message {
            role: "assistant".into(),
            content: "sure".into(),
        },
    ];
    let (tokens, trainable) = t.encode(&msgs, &ByteTokenizer).unwrap();
    let text: String = tokens.iter().map(|&i| (i - 2) as u8 as char).collect();
    assert_eq!(text, t.render(&msgs, false).unwrap());
    let trained: String = tokens
        .iter()
        .zip(&trainable)
        .filter(|(_, &m)| m)
        .map(|(&i, _)| (i - 2) as u8 as char)
        .collect();
    assert_eq!(trained, "yo<|im_end|>\nsure<|im_end|>\n");
}

#[test]
fn chat_template_from_a_model_renders_with_system_default() {
    // SmolLM2's template inserts a default system prompt.
    let src = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
    let t = ChatTemplate::new(src, "<|im_start|>", "<|im_end|>").unwrap();
    let msgs = vec![
        Message {
            role: "user".into(),
            content: "hi".into(),
        },
        Message {
            role: "assistant".into(),
            content: "yo".into(),
        },
    ];
    let (tokens, trainable) = t.encode(&msgs, &ByteTokenizer).unwrap();
    let trained: String = tokens
        .iter()
        .zip(&trainable)
        .filter(|(_, &m)| m)
        .map(|(&i, _)| (i - 2) as u8 as char)
        .collect();
    assert_eq!(trained, "yo<|im_end|>\n");
    let all: String = tokens.iter().map(|&i| (i - 2) as u8 as char).collect();
    assert!(
        all.starts_with("<|im_start|>system\nYou are a helpful"),
        "{all}"
    );
}

#[test]
fn bad_jsonl_lines_are_reported_with_their_number() {
    let dir = train_common::temp_dir("bad");
    let p = write(
        &dir,
        "d.jsonl",
        "{\"text\": \"ok\"}\n{\"text\": \"fine\"}\n{not json}\n",
    );
    let err = load_examples(&p, &ByteTokenizer, &ChatTemplate::chatml(), 64)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("d.jsonl:3:") && err.contains("invalid JSON"),
        "{err}"
    );
    let p = write(
        &dir,
        "e.jsonl",
        "{\"text\": \"ok\"}\n{\"question\": \"?\"}\n",
    );
    let err = load_examples(&p, &ByteTokenizer, &ChatTemplate::chatml(), 64)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("e.jsonl:2:") && err.contains("question"),
        "{err}"
    );
    let p = write(
        &dir,
        "f.jsonl",
        "{\"messages\": [{\"role\": \"user\", \"content\": \"only a question\"}]}\n",
    );
    let err = load_examples(&p, &ByteTokenizer, &ChatTemplate::chatml(), 64)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("f.jsonl:1:") && err.contains("no assistant"),
        "{err}"
    );
}

#[test]
fn plain_text_is_chunked_into_sequences() {
    let dir = train_common::temp_dir("plain");
    let p = write(&dir, "t.txt", &"x".repeat(25));
    let (ex, stats) = load_examples(&p, &ByteTokenizer, &ChatTemplate::chatml(), 10).unwrap();
    assert_eq!(
        ex.iter().map(|e| e.tokens.len()).collect::<Vec<_>>(),
        vec![10, 10, 6]
    ); // 25 bytes + eos
    assert_eq!(stats.tokens, 26);
}

fn ex(tokens: &[u32], trainable: &[bool]) -> Example {
    Example {
        tokens: tokens.to_vec(),
        trainable: trainable.to_vec(),
    }
}

#[test]
fn packing_restarts_positions_and_never_crosses_examples() {
    let examples = vec![
        ex(&[10, 11, 12], &[false, true, true]),
        ex(&[20, 21], &[true, true]),
        ex(&[30, 31, 32, 33], &[true; 4]),
    ];
    let rows = pack_rows(&examples, 6, true).unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].tokens, vec![10, 11, 12, 20, 21]);
    assert_eq!(rows[0].positions, vec![0, 1, 2, 0, 1]);
    assert_eq!(rows[0].segments, vec![1, 1, 1, 2, 2]);
    let (targets, mask) = rows[0].targets();
    // 10→11, 11→12 trained; 12→20 crosses examples; 20→21 trained; last has no next.
    assert_eq!(targets, vec![11, 12, 0, 21, 0]);
    assert_eq!(mask, vec![1.0, 1.0, 0.0, 1.0, 0.0]);
    let unpacked = pack_rows(&examples, 6, false).unwrap();
    assert_eq!(unpacked.len(), 3);
    assert!(pack_rows(&examples, 3, true)
        .unwrap_err()
        .to_string()
        .contains("more than seq_len 3"));
}

#[test]
fn batches_pad_and_mask_attention() {
    let examples = vec![ex(&[1, 2, 3], &[true; 3]), ex(&[4, 5], &[true; 2])];
    let rows = pack_rows(&examples, 4, false).unwrap();
    let batch = Batch::from_rows(&rows.iter().collect::<Vec<_>>(), &Device::Cpu).unwrap();
    assert_eq!(batch.dims(), (2, 3));
    assert_eq!(batch.n_tokens, 5);
    assert_eq!(batch.n_targets, 3);
    assert_eq!(
        batch.segment_ids.to_vec2::<u32>().unwrap(),
        vec![vec![1, 1, 1], vec![1, 1, 0]]
    );
    let packed = pack_rows(&examples, 5, true).unwrap();
    let batch = Batch::from_rows(&packed.iter().collect::<Vec<_>>(), &Device::Cpu).unwrap();
    let bias = batch
        .attention_bias(DType::F32, &Device::Cpu)
        .unwrap()
        .squeeze(1)
        .unwrap()
        .to_vec3::<f32>()
        .unwrap();
    let visible: Vec<Vec<bool>> = bias[0]
        .iter()
        .map(|r| r.iter().map(|v| *v == 0.0).collect())
        .collect();
    assert_eq!(visible[2], vec![true, true, true, false, false]);
    assert_eq!(visible[3], vec![false, false, false, true, false]); // second example starts fresh
    assert_eq!(visible[4], vec![false, false, false, true, true]);
}

#[test]
fn loader_resumes_from_a_position_exactly() {
    let examples: Vec<Example> = (0..7u32).map(|i| ex(&[i + 1, i + 2], &[true; 2])).collect();
    let rows = pack_rows(&examples, 2, false).unwrap();
    let mut a = DataLoader::new(rows.clone(), 3, 42, true).unwrap();
    let first: Vec<Vec<u32>> = (0..4)
        .flat_map(|_| {
            a.next_rows()
                .into_iter()
                .map(|r| r.tokens.clone())
                .collect::<Vec<_>>()
        })
        .collect();
    let mut b = DataLoader::new(rows, 3, 42, true).unwrap();
    b.next_rows();
    b.next_rows();
    let pos = b.position();
    let mut c = DataLoader::new(b.rows().to_vec(), 3, 42, true).unwrap();
    c.seek(pos).unwrap();
    let rest: Vec<Vec<u32>> = (0..2)
        .flat_map(|_| {
            c.next_rows()
                .into_iter()
                .map(|r| r.tokens.clone())
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(&first[6..], &rest[..]);
    // Every row appears once in the first epoch (7 rows).
    let mut epoch0: Vec<_> = first[..7].to_vec();
    epoch0.sort();
    epoch0.dedup();
    assert_eq!(epoch0.len(), 7);
}

#[test]
fn validation_split_is_seeded_and_disjoint() {
    let examples: Vec<Example> = (0..20u32).map(|i| ex(&[i], &[true])).collect();
    let (t1, v1) = split_validation(examples.clone(), 0.25, 3).unwrap();
    let (t2, v2) = split_validation(examples, 0.25, 3).unwrap();
    assert_eq!((t1.len(), v1.len()), (15, 5));
    assert_eq!(v1, v2);
    assert_eq!(t1, t2);
    assert!(v1.iter().all(|v| !t1.contains(v)));
}
