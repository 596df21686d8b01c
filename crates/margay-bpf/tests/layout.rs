//! Habit 1: the Rust mirrors of the shared C structs match the C, as the compiler laid it out.
//! Reads the BTF of every embedded object (no root needed) and compares each struct's size and
//! each field's name, offset and size with `margay_bpf::maps::shared_layouts()`.

use margay_bpf::{layout::btf_structs, maps::shared_layouts, objects};

#[test]
fn layout_matches_btf() {
    let mirrors = shared_layouts();
    let mut checked = 0;
    for (object, bytes) in objects::ALL {
        let btf = btf_structs(bytes).unwrap_or_else(|e| panic!("{object}: {e}"));
        for rust in &mirrors {
            let Some(c) = btf.get(&rust.name) else {
                continue;
            };
            assert_eq!(
                c, rust,
                "{object}: struct {} differs between C (left) and Rust",
                rust.name
            );
            checked += 1;
        }
    }
    // Every mirror was found in at least one object.
    for rust in &mirrors {
        assert!(
            objects::ALL
                .iter()
                .any(|(_, b)| btf_structs(b).expect("btf").contains_key(&rust.name)),
            "struct {} is in no object's BTF: is it still used by a map?",
            rust.name
        );
    }
    assert!(checked >= mirrors.len());
}

#[test]
fn btf_reader_sees_kernel_style_structs() {
    // A sanity check of the reader itself on a struct we did not write.
    let btf = btf_structs(objects::TC).expect("btf");
    let skb = btf
        .get("__sk_buff")
        .expect("struct __sk_buff in tc.o's BTF");
    assert_eq!(skb.size, 192);
    // The offsets `Dataplane::run_tc_with` writes its context at.
    for (name, offset) in [
        ("mark", 8),
        ("ingress_ifindex", 36),
        ("ifindex", 40),
        ("gso_segs", 164),
        ("gso_size", 176),
    ] {
        let f = skb.fields.iter().find(|f| f.name == name).expect(name);
        assert_eq!((f.offset, f.size), (offset, 4), "__sk_buff.{name}");
    }
}
