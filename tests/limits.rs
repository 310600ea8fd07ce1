//! Request limits set low through runtime options refuse small requests on
//! the tiny SD 1.5 fixture, naming the value, the limit and the option; an
//! init image is judged by its PNG header, before it is decoded.

mod common;

use spo_runtime::pipeline::{JobSpec, Pipeline};
use spo_runtime::text::LongPrompt;
use spo_runtime::{ErrorCode, Options, Runtime};

fn pipeline(limits: &[(&str, &str)]) -> Pipeline {
    let mut o = Options::from_pairs([("ep", "cpu")]).unwrap();
    for (k, v) in limits {
        o.set(k, v).unwrap();
    }
    let rt = Runtime::new(&o, Default::default()).unwrap();
    Pipeline::load(&rt, &common::fixture("tiny-sd15"), &Options::new()).unwrap()
}

fn small() -> JobSpec {
    JobSpec {
        prompt: "a lighthouse".into(),
        width: Some(64),
        height: Some(64),
        steps: 2,
        ..JobSpec::default()
    }
}

fn refusal(p: &Pipeline, spec: JobSpec) -> String {
    let e = p.job(spec).err().expect("the job must be refused");
    assert_eq!(e.code, ErrorCode::InvalidOptionValue, "{}", e.message);
    e.message
}

#[test]
fn low_limits_refuse_small_requests_with_named_messages() {
    let p = pipeline(&[
        ("limits.max_side", "48"),
        ("limits.max_steps", "3"),
        ("limits.max_batch", "2"),
    ]);
    let m = refusal(&p, small());
    assert_eq!(m, "width 64 exceeds the limit 48 (option limits.max_side)");
    let p = pipeline(&[
        ("limits.max_pixels", "4000"),
        ("limits.max_steps", "3"),
        ("limits.max_batch", "2"),
    ]);
    let m = refusal(&p, small());
    assert!(
        m.contains("64x64 = 4096 pixels exceeds the limit 4000 (option limits.max_pixels)"),
        "{m}"
    );
    let p = pipeline(&[("limits.max_steps", "3"), ("limits.max_batch", "2")]);
    let m = refusal(
        &p,
        JobSpec {
            steps: 4,
            ..small()
        },
    );
    assert_eq!(m, "steps 4 exceeds the limit 3 (option limits.max_steps)");
    let m = refusal(
        &p,
        JobSpec {
            num_images: 3,
            ..small()
        },
    );
    assert_eq!(
        m,
        "num_images 3 exceeds the limit 2 (option limits.max_batch)"
    );
    // Within the limits the same pipeline works.
    let mut job = p
        .job(JobSpec {
            num_images: 2,
            ..small()
        })
        .unwrap();
    job.run().unwrap();
    assert_eq!(job.take_images().unwrap().len(), 2);
}

#[test]
fn prompt_windows_are_limited() {
    let p = pipeline(&[("limits.max_prompt_windows", "1")]);
    let long = "a red circle on a blue background ".repeat(20);
    let spec = JobSpec {
        prompt: long,
        long_prompt: LongPrompt::Chunks,
        ..small()
    };
    let mut job = p.job(spec).unwrap();
    let e = job.run().unwrap_err();
    assert!(
        e.message
            .contains("exceeds the limit 1 (option limits.max_prompt_windows)"),
        "{}",
        e.message
    );
}

/// A PNG whose header says `w` x `h` RGB8, followed by an empty IDAT: the
/// header is all a size check may read.
fn png_header_only(w: u32, h: u32) -> Vec<u8> {
    fn crc32(bytes: &[u8]) -> u32 {
        let mut c = 0xffff_ffffu32;
        for &b in bytes {
            c ^= b as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0xedb8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
        }
        !c
    }
    fn chunk(out: &mut Vec<u8>, kind: &[u8], data: &[u8]) {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let start = out.len();
        out.extend_from_slice(kind);
        out.extend_from_slice(data);
        let crc = crc32(&out[start..]);
        out.extend_from_slice(&crc.to_be_bytes());
    }
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    chunk(&mut out, b"IHDR", &ihdr);
    chunk(&mut out, b"IDAT", &[]);
    chunk(&mut out, b"IEND", &[]);
    out
}

#[test]
fn init_images_are_judged_by_their_header() {
    let dir = std::env::temp_dir().join(format!("spo-limits-it-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = pipeline(&[]);
    // 60000x60000 would need 10.8 GB decoded.
    let huge = dir.join("huge.png");
    std::fs::write(&huge, png_header_only(60000, 60000)).unwrap();
    let spec = JobSpec {
        init_image: Some(huge.clone()),
        ..small()
    };
    let e = p.job(spec).err().expect("refused");
    assert!(
        e.message
            .contains("huge.png: width 60000 exceeds the limit 16384"),
        "{}",
        e.message
    );
    // Within the limits but not the job's size: refused before decoding.
    let other = dir.join("other.png");
    std::fs::write(&other, png_header_only(128, 96)).unwrap();
    let spec = JobSpec {
        init_image: Some(other),
        ..small()
    };
    let e = p.job(spec).err().expect("refused");
    assert_eq!(e.code, ErrorCode::InvalidArgument);
    assert!(
        e.message.contains("is 128x96; the job is 64x64"),
        "{}",
        e.message
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// CLIP's BPE is quadratic in one word's length: a prompt's bytes are
/// bounded before it is tokenized, so a megabyte-long word cannot stall a job.
#[test]
fn a_prompt_over_the_byte_limit_is_refused_before_tokenizing() {
    let o = Options::from_pairs([("ep", "cpu"), ("limits.max_prompt_bytes", "1000")]).unwrap();
    let rt = Runtime::new(&o, Default::default()).unwrap();
    let p = Pipeline::load(&rt, &common::fixture("tiny-sd15"), &Options::new()).unwrap();
    let word = "x".repeat(1001);
    for (prompt, negative) in [(word.as_str(), None), ("a cat", Some(word.as_str()))] {
        let e = p
            .encode_prompts(prompt, negative, true, 0, LongPrompt::Truncate)
            .unwrap_err();
        assert!(
            e.message.contains("1001") && e.message.contains("limits.max_prompt_bytes"),
            "{}",
            e.message
        );
    }
    assert!(p
        .encode_prompts(&"x".repeat(1000), None, true, 0, LongPrompt::Truncate)
        .is_ok());
}
