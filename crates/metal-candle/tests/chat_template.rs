//! Chat templates render as transformers' `apply_chat_template` does.

use metal_candle::generate::{ChatTemplate, Message};

/// SmolLM2-Instruct's template, as stored in its tokenizer_config.json and GGUF metadata.
const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

#[test]
fn smollm2_template_with_and_without_generation_prompt() {
    let t = ChatTemplate::new(SMOLLM2, "<|im_start|>", "<|im_end|>").unwrap();
    let msgs = [Message::new("user", "What is the capital of France?")];
    assert_eq!(
        t.render(&msgs, true).unwrap(),
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    );
    let msgs = [
        Message::new("system", "Be brief."),
        Message::new("user", "Hi"),
        Message::new("assistant", "Hello."),
        Message::new("user", "Bye"),
    ];
    assert_eq!(
        t.render(&msgs, false).unwrap(),
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
         <|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
    );
}

#[test]
fn jinja_as_transformers_renders_it() {
    // trim_blocks/lstrip_blocks, Python string methods, bos/eos in the context.
    let src = "{{ bos_token }}\n{% for m in messages %}\n    {% if m.role == 'user' %}\n[INST] {{ m.content.strip() }} [/INST]\n    {% else %}\n{{ m.content }}{{ eos_token }}\n    {% endif %}\n{% endfor %}";
    let t = ChatTemplate::new(src, "<s>", "</s>").unwrap();
    let out = t
        .render(
            &[
                Message::new("user", "  hi  "),
                Message::new("assistant", "yo"),
            ],
            false,
        )
        .unwrap();
    assert_eq!(out, "<s>\n[INST] hi [/INST]\nyo</s>\n");
}

#[test]
fn raise_exception_and_bad_templates_are_errors() {
    let src = "{% if messages[0].role != 'user' %}{{ raise_exception('Conversation must start with a user turn') }}{% endif %}ok";
    let t = ChatTemplate::new(src, "", "").unwrap();
    assert_eq!(t.render(&[Message::new("user", "x")], false).unwrap(), "ok");
    let err = t
        .render(&[Message::new("assistant", "x")], false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("must start with a user turn"), "{err}");
    let err = ChatTemplate::new("{% for %}", "", "")
        .unwrap_err()
        .to_string();
    assert!(err.contains("does not parse"), "{err}");
}

#[test]
fn template_from_a_tokenizer_config() {
    let dir = std::env::temp_dir().join(format!("mc-chat-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tokenizer_config.json");
    let cfg = serde_json::json!({"chat_template": SMOLLM2, "bos_token": {"content": "<|im_start|>"}, "eos_token": "<|im_end|>"});
    std::fs::write(&path, cfg.to_string()).unwrap();
    let t = ChatTemplate::from_tokenizer_config(&path).unwrap();
    assert!(t
        .render(&[Message::new("user", "x")], true)
        .unwrap()
        .ends_with("<|im_start|>assistant\n"));
    std::fs::write(&path, "{}").unwrap();
    let err = ChatTemplate::from_tokenizer_config(&path)
        .unwrap_err()
        .to_string();
    assert!(err.contains("no chat_template"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
