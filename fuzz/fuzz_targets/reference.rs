//! Image references: whatever parses prints back to text that parses to the same reference, and
//! `Reference::named` gives the name and tag it was asked for, or an error.
#![no_main]

use imago_oci::Reference;
use imago_oci::reference::MIN_PREFIX_LEN;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(reference) = text.parse::<Reference>() {
        let printed = reference.to_string();
        let again: Reference = printed
            .parse()
            .unwrap_or_else(|e| panic!("{text:?} printed as {printed:?}, which fails: {e}"));
        assert_eq!(again, reference, "{text:?} printed as {printed:?}");
        assert_eq!(again.to_string(), printed);
        if let Some(name) = reference.ref_name() {
            let named: Reference = name
                .parse()
                .unwrap_or_else(|e| panic!("ref_name {name:?} of {text:?} fails: {e}"));
            assert_eq!(named.ref_name().as_deref(), Some(name.as_str()));
        }
        if let Some(prefix) = reference.digest_prefix() {
            assert!(prefix.len() >= MIN_PREFIX_LEN && prefix.len() <= 64);
            assert!(prefix.bytes().all(|b| b.is_ascii_hexdigit()));
        }
    }
    // `Reference::named` takes name and tag apart: the input is `NAME\0TAG`.
    if let Some((name, tag)) = text.split_once('\0')
        && let Ok(reference) = Reference::named(name, tag)
    {
        match &reference {
            Reference::Name {
                name: n,
                tag: Some(t),
                digest: None,
            } => {
                assert_eq!(
                    (n.as_str(), t.as_str()),
                    (name, tag),
                    "named({name:?}, {tag:?})"
                );
            }
            other => panic!("named({name:?}, {tag:?}) gave {other:?}"),
        }
        assert_eq!(reference.ref_name(), Some(format!("{name}:{tag}")));
    }
});
