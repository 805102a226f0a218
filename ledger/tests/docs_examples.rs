//! The worked examples of docs/ledger-format.md are real outputs of this
//! crate: every example block in the document (each after an
//! `<!-- example:NAME -->` marker) is recomputed here from the fixed inputs
//! the document states and compared byte for byte, and the document's own
//! checkpoint and receipt are verified with the document's own verifier key
//! through the functions an offline verifier uses. Editing an example in the
//! document, or changing the encoding, hashing or signing code, fails this
//! test.
//!
//! When the format changes on purpose, the assertion messages print the
//! block the document must hold.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;

use base64::prelude::{Engine as _, BASE64_STANDARD};
use ring::signature::{UnparsedPublicKey, ED25519};
use sha2::{Digest as _, Sha256};
use sovra_ledger::entry::{PolicyChange, FORMAT_VERSION};
use sovra_ledger::{
    leaf_hash, verify_checkpoint, verify_inclusion, verify_receipt, Body, Digest, Entry, Ledger,
    LedgerOptions, LogKey, TlogProof,
};

/// The documentation-only signing key seed: 32 bytes of 0x05. Public; never
/// use it for a real log.
const DOC_SEED: [u8; 32] = [0x05; 32];
/// The origin of the examples.
const DOC_ORIGIN: &str = "sovra.test/log";

fn doc() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/ledger-format.md");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The lines after the marker `<!-- example:NAME -->` (which must occur
/// exactly once, on its own line).
fn after_marker<'a>(doc: &'a str, name: &str) -> std::str::Lines<'a> {
    let marker = format!("<!-- example:{name} -->");
    let found: Vec<usize> = doc
        .lines()
        .enumerate()
        .filter(|(_, l)| l.trim_end() == marker)
        .map(|(i, _)| i)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "docs/ledger-format.md must hold `{marker}` exactly once"
    );
    let mut lines = doc.lines();
    for _ in 0..=found[0] {
        lines.next();
    }
    lines
}

/// The content of the fenced block right after the marker, each line
/// followed by `\n`, exactly as written.
fn block(doc: &str, name: &str) -> String {
    let mut lines = after_marker(doc, name);
    let open = lines.next().unwrap_or_default();
    assert!(
        open.starts_with("```"),
        "`<!-- example:{name} -->` must be followed by a fenced block, found {open:?}"
    );
    let mut out = String::new();
    for l in lines {
        if l == "```" {
            return out;
        }
        out.push_str(l);
        out.push('\n');
    }
    panic!("the block of example `{name}` is not closed");
}

/// The rows of the Markdown table right after the marker (header and
/// separator dropped), each as its trimmed cells.
fn table(doc: &str, name: &str) -> Vec<Vec<String>> {
    let rows: Vec<Vec<String>> = after_marker(doc, name)
        .take_while(|l| l.starts_with('|'))
        .map(|l| {
            l.trim()
                .trim_matches('|')
                .split('|')
                .map(|c| c.trim().to_owned())
                .collect()
        })
        .collect();
    assert!(rows.len() > 2, "example `{name}` must be a table");
    rows[2..].to_vec()
}

fn assert_block(doc: &str, name: &str, want: &str) {
    let got = block(doc, name);
    assert!(
        got == want,
        "docs/ledger-format.md, example `{name}` is not what the code produces.\n\
         --- the document has:\n{got}--- the code produces:\n{want}---"
    );
}

/// The example entry of §1.6: `policy_changed`, `seq` 0, `timestamp_ms` 1,
/// `prev_hash` zero, actor "a", policy digest 32 × 0x11, empty summary, in
/// the format every entry is appended in now.
fn doc_entry() -> Entry {
    Entry {
        format: FORMAT_VERSION,
        seq: 0,
        timestamp_ms: 1,
        prev_hash: Digest([0; 32]),
        body: doc_body(),
    }
}

fn doc_body() -> Body {
    Body::PolicyChanged(PolicyChange {
        actor: "a".into(),
        policy_sha256: Digest([0x11; 32]),
        summary: String::new(),
    })
}

fn doc_key() -> LogKey {
    LogKey::from_seed(DOC_ORIGIN, &DOC_SEED).unwrap()
}

/// The public key of the documentation key, as raw 32 bytes.
fn doc_public_key() -> [u8; 32] {
    let vkey = doc_key().verifier_key();
    let b64 = vkey.rsplit('+').next().unwrap();
    let raw = BASE64_STANDARD.decode(b64).unwrap();
    assert_eq!(raw.len(), 33);
    assert_eq!(raw[0], 0x01, "Ed25519 algorithm byte");
    raw[1..].try_into().unwrap()
}

/// The receipt of entry 0 of the one-entry tree, as `Ledger::receipt`
/// builds it: no `extra`, no proof hashes, the checkpoint of size 1.
fn receipt_text(checkpoint: &[u8]) -> String {
    TlogProof {
        extra: None,
        index: 0,
        hashes: vec![],
        checkpoint: checkpoint.to_vec(),
    }
    .to_text()
}

fn sha256(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

/// Decodes a table cell of §1.6: `` `02` ``, `` `00 00 00 25` `` or
/// `` `11` × 32 ``.
fn cell_bytes(cell: &str) -> Vec<u8> {
    if cell.is_empty() {
        return vec![];
    }
    let (hex_part, times) = match cell.split_once('×') {
        Some((h, n)) => (h.trim(), n.trim().parse::<usize>().unwrap()),
        None => (cell, 1),
    };
    let hex_part = hex_part
        .strip_prefix('`')
        .and_then(|h| h.strip_suffix('`'))
        .unwrap_or_else(|| panic!("table cell {cell:?} is not `hex`"));
    let one = hex::decode(hex_part.replace(' ', "")).unwrap();
    one.repeat(times)
}

#[test]
fn ledger_format_doc_examples_are_real_outputs() {
    let doc = doc();
    let entry = doc_entry();
    let bytes = entry.encode().unwrap();
    let leaf = leaf_hash(&bytes);
    let key = doc_key();
    let vkey = key.verifier_key();
    let public = doc_public_key();
    let cp = key.sign_checkpoint(1, &leaf).unwrap();
    let note = String::from_utf8(cp.note.clone()).unwrap();

    // §1.6: the byte table, row by row at its offsets.
    let mut from_table = Vec::new();
    for row in table(&doc, "entry-table") {
        let offset: usize = row[0].parse().unwrap();
        assert_eq!(offset, from_table.len(), "§1.6 table: row {row:?}");
        from_table.extend(cell_bytes(&row[1]));
    }
    assert_eq!(
        from_table,
        bytes,
        "§1.6 table is not the entry's encoding ({})",
        hex::encode(&bytes)
    );

    // §1.6: hex, 32 bytes a line.
    let hex_lines: String = hex::encode(&bytes)
        .as_bytes()
        .chunks(64)
        .map(|c| format!("{}\n", std::str::from_utf8(c).unwrap()))
        .collect();
    assert_block(&doc, "entry-hex", &hex_lines);

    // §1.6: base64.
    assert_block(
        &doc,
        "entry-base64",
        &format!("{}\n", BASE64_STANDARD.encode(&bytes)),
    );

    // §1.6: leaf hash.
    assert_block(
        &doc,
        "leaf-hash",
        &format!(
            "{}\nbase64: {}\n",
            hex::encode(leaf),
            BASE64_STANDARD.encode(leaf)
        ),
    );

    // §1.6: the JSON rendering of §1.7.
    assert_block(
        &doc,
        "entry-json",
        &format!("{}\n", serde_json::to_string(&entry).unwrap()),
    );

    // §3: the checkpoint of the one-entry tree.
    assert_block(&doc, "checkpoint", &note);

    // §4: the documentation key.
    let key_id = vkey.split('+').nth(1).unwrap();
    assert_block(
        &doc,
        "verifier-key",
        &format!(
            "seed:         {}\npublic key:   {}\nkey id:       {key_id}\nverifier key: {vkey}\n",
            hex::encode(DOC_SEED),
            hex::encode(public)
        ),
    );

    // §5: the receipt.
    assert_block(&doc, "receipt", &receipt_text(&cp.note));
}

/// The document's examples, read back from the document, verify with the
/// document's key through the offline verifier's functions, and agree with
/// RFC 9162 and C2SP computed independently here.
#[test]
fn ledger_format_doc_examples_verify_offline() {
    let doc = doc();
    let hex_block = block(&doc, "entry-hex");
    let entry_bytes = hex::decode(hex_block.replace('\n', "")).unwrap();
    let b64_entry = BASE64_STANDARD
        .decode(block(&doc, "entry-base64").trim_end())
        .unwrap();
    assert_eq!(b64_entry, entry_bytes, "§1.6 hex and base64 differ");
    let note = block(&doc, "checkpoint");
    let receipt = block(&doc, "receipt");
    let key_lines = block(&doc, "verifier-key");
    let field = |name: &str| -> String {
        key_lines
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_owned())
            .unwrap_or_else(|| panic!("§4 example has no `{name}` line"))
    };
    let vkey = field("verifier key:");
    let public = hex::decode(field("public key:")).unwrap();

    // The entry decodes to the stated inputs, in the current format.
    let entry = Entry::decode(&entry_bytes).unwrap();
    assert_eq!(entry, doc_entry());
    assert_eq!(entry_bytes[0], FORMAT_VERSION);
    assert_eq!(entry_bytes[0], 0x02, "§1.1: entries are appended as 0x02");

    // RFC 9162 §2.1.1, independently: leaf = SHA-256(0x00 ‖ entry), and a
    // one-leaf tree's root is its leaf hash.
    let leaf = sha256(&[&[0x00], &entry_bytes]);
    assert_eq!(leaf, leaf_hash(&entry_bytes));
    let leaf_block = block(&doc, "leaf-hash");
    assert_eq!(
        leaf_block,
        format!(
            "{}\nbase64: {}\n",
            hex::encode(leaf),
            BASE64_STANDARD.encode(leaf)
        )
    );

    // §3: the checkpoint verifies with the §4 key and signs (1, leaf).
    let cp = verify_checkpoint(note.as_bytes(), &vkey).unwrap();
    assert_eq!(cp.origin, DOC_ORIGIN);
    assert_eq!(cp.size, 1);
    assert_eq!(cp.root, leaf, "the §3 root is not the §1.6 leaf hash");
    verify_inclusion::<[u8; 32]>(0, 1, &leaf, &[], &cp.root).unwrap();

    // §3 layout, independently of signed_note: body, blank line, one
    // signature line `— origin base64(key id ‖ Ed25519 signature)`.
    let (body, sigs) = note.split_once("\n\n").unwrap();
    let body = format!("{body}\n");
    assert_eq!(
        body,
        format!("{DOC_ORIGIN}\n1\n{}\n", BASE64_STANDARD.encode(leaf))
    );
    let sig_line = sigs.strip_suffix('\n').unwrap();
    assert!(!sig_line.contains('\n'), "one signature line");
    let sig_b64 = sig_line
        .strip_prefix(&format!("\u{2014} {DOC_ORIGIN} "))
        .unwrap();
    assert_eq!(sig_b64.len(), 92);
    let sig = BASE64_STANDARD.decode(sig_b64).unwrap();
    assert_eq!(sig.len(), 68);
    UnparsedPublicKey::new(&ED25519, &public)
        .verify(body.as_bytes(), &sig[4..])
        .expect("the §3 signature verifies over the body with the §4 public key");

    // §4, independently: key id = first 4 bytes of
    // SHA-256(origin ‖ "\n" ‖ 0x01 ‖ public key), and the verifier key.
    let id = sha256(&[DOC_ORIGIN.as_bytes(), b"\n", &[0x01], &public]);
    assert_eq!(&sig[..4], &id[..4]);
    let mut alg_pk = vec![0x01];
    alg_pk.extend_from_slice(&public);
    let b64_pk = BASE64_STANDARD.encode(&alg_pk);
    assert_eq!(b64_pk.len(), 44);
    assert_eq!(field("key id:"), hex::encode(&id[..4]));
    assert_eq!(
        vkey,
        format!("{DOC_ORIGIN}+{}+{b64_pk}", hex::encode(&id[..4]))
    );
    assert_eq!(field("seed:"), hex::encode(DOC_SEED));

    // §5: the receipt verifies the §1.6 entry against the §3 checkpoint, and
    // carries exactly that checkpoint.
    let (e, rcp) = verify_receipt(&entry_bytes, receipt.as_bytes(), &vkey).unwrap();
    assert_eq!(e, doc_entry());
    assert_eq!(rcp.note, note.as_bytes());
    let p = TlogProof::parse(receipt.as_bytes()).unwrap();
    assert_eq!((p.extra, p.index, p.hashes.len()), (None, 0, 0));

    // What the bug report found: the same entry with another version byte
    // has another leaf hash, and the receipt refuses it.
    for version in [0x01u8, 0x03] {
        let mut other = entry_bytes.clone();
        other[0] = version;
        assert_ne!(leaf_hash(&other), cp.root);
        assert!(verify_receipt(&other, receipt.as_bytes(), &vkey).is_err());
    }
    // Any change to the checkpoint's body or signature is refused.
    for at in [0, body.len() - 2, note.len() - 3] {
        let mut bad = note.clone().into_bytes();
        bad[at] ^= 0x01;
        assert!(verify_checkpoint(&bad, &vkey).is_err(), "flipped byte {at}");
    }
}

/// The recipe the examples are built with is the server's: a ledger opened
/// with the documentation key that appends the §1.6 body writes the same
/// bytes but for its clock, and its receipt is the one rebuilt from its
/// entry by the steps above.
#[test]
fn ledger_format_doc_recipe_matches_the_ledger() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::open(dir.path(), doc_key(), LedgerOptions::default()).unwrap();
    assert_eq!(ledger.verifier_key(), doc_key().verifier_key());
    let appended = ledger.append(&[doc_body()]).unwrap();
    ledger.flush().unwrap();
    let bytes = &appended[0].bytes;
    let mut entry = Entry::decode(bytes).unwrap();
    assert_eq!(entry.format, FORMAT_VERSION);
    entry.timestamp_ms = 1;
    assert_eq!(entry.encode().unwrap(), doc_entry().encode().unwrap());

    let receipt = ledger.receipt(0).unwrap();
    assert_eq!(&receipt.entry, bytes);
    let cp = doc_key().sign_checkpoint(1, &leaf_hash(bytes)).unwrap();
    assert_eq!(receipt.proof.to_text(), receipt_text(&cp.note));
    verify_receipt(
        bytes,
        receipt.proof.to_text().as_bytes(),
        &ledger.verifier_key(),
    )
    .unwrap();
}
