//! The on-disk format: segment headers and frames, encoded and scanned.
//!
//! A segment file starts with a 24-byte header:
//! `"SOVRAWAL"` ‖ version u32 ‖ first LSN u64 ‖ CRC32C of the 20 bytes
//! before it (u32). All integers are big-endian.
//!
//! Then frames follow back to back. A frame holds the records of one append
//! (one request's records: all of them reach disk or none do):
//!
//! | bytes | field                                                      |
//! |-------|------------------------------------------------------------|
//! | 4     | magic `0x53574C31` ("SWL1")                                |
//! | 4     | payload length                                             |
//! | 8     | LSN of the frame's first record                            |
//! | 8     | `synced`: the durable LSN when the frame's group was written |
//! | 4     | record count                                               |
//! | 4     | CRC32C of the 28 header bytes before it and the payload    |
//! | len   | payload: per record, its length (u32) and its bytes        |
//!
//! After the last frame, the rest of a segment may be zeros: space the
//! writer allocated ahead of its appends, so that a group's `fdatasync`
//! need not also write the file's new size. No frame begins with a zero
//! byte (the magic), so zeros to the end of the file are a clean end, never
//! a frame and never damage; anything else after the last frame is.
//!
//! A record's LSN is its position in the log counting records from 0, so
//! LSNs are dense and frames chain: each frame's first LSN is the previous
//! frame's first LSN plus its count.
//!
//! The scanner never panics and never allocates more than the input's
//! length, whatever the bytes (see the proptests in `tests/`).

/// Segment header length.
pub const SEGMENT_HEADER: usize = 24;
/// Frame header length.
pub const FRAME_HEADER: usize = 32;
const SEGMENT_MAGIC: &[u8; 8] = b"SOVRAWAL";
const VERSION: u32 = 1;
const FRAME_MAGIC: u32 = 0x5357_4C31;

/// Largest frame payload accepted (and written).
pub const MAX_FRAME: usize = 64 * 1024 * 1024;

/// A decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Byte offset of the frame in its segment.
    pub offset: u64,
    /// LSN of its first record.
    pub lsn: u64,
    /// Durable LSN when it was written.
    pub synced: u64,
    /// Its records.
    pub records: Vec<Vec<u8>>,
    /// Encoded length.
    pub len: u64,
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at + 4)
        .and_then(|s| <[u8; 4]>::try_from(s).ok())
        .map(u32::from_be_bytes)
}
fn be64(b: &[u8], at: usize) -> Option<u64> {
    b.get(at..at + 8)
        .and_then(|s| <[u8; 8]>::try_from(s).ok())
        .map(u64::from_be_bytes)
}

/// Encodes a segment header.
pub fn segment_header(first_lsn: u64) -> [u8; SEGMENT_HEADER] {
    let mut h = [0u8; SEGMENT_HEADER];
    h[..8].copy_from_slice(SEGMENT_MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_be_bytes());
    h[12..20].copy_from_slice(&first_lsn.to_be_bytes());
    let crc = crc32c::crc32c(&h[..20]);
    h[20..].copy_from_slice(&crc.to_be_bytes());
    h
}

/// Decodes a segment header: its first LSN, or why it is not one.
pub fn parse_segment_header(b: &[u8]) -> Result<u64, String> {
    let h = b.get(..SEGMENT_HEADER).ok_or_else(|| {
        format!(
            "the file is {} bytes, shorter than a segment header",
            b.len()
        )
    })?;
    if &h[..8] != SEGMENT_MAGIC {
        return Err("it does not start with the segment magic `SOVRAWAL`".into());
    }
    let crc = be32(h, 20).unwrap_or(0);
    if crc32c::crc32c(&h[..20]) != crc {
        return Err("its header checksum does not match".into());
    }
    let version = be32(h, 8).unwrap_or(0);
    if version != VERSION {
        return Err(format!(
            "its format version is {version}; this build reads version {VERSION}"
        ));
    }
    Ok(be64(h, 12).unwrap_or(0))
}

/// Appends one frame holding `records` to `out`.
pub fn encode_frame(out: &mut Vec<u8>, lsn: u64, synced: u64, records: &[&[u8]]) {
    let payload: usize = records.iter().map(|r| 4 + r.len()).sum();
    let start = out.len();
    out.reserve(FRAME_HEADER + payload);
    out.extend_from_slice(&FRAME_MAGIC.to_be_bytes());
    // INVARIANT: callers check the payload against MAX_FRAME (< u32::MAX).
    out.extend_from_slice(&(payload as u32).to_be_bytes());
    out.extend_from_slice(&lsn.to_be_bytes());
    out.extend_from_slice(&synced.to_be_bytes());
    out.extend_from_slice(&(records.len() as u32).to_be_bytes());
    out.extend_from_slice(&[0; 4]);
    for r in records {
        out.extend_from_slice(&(r.len() as u32).to_be_bytes());
        out.extend_from_slice(r);
    }
    let mut crc = crc32c::crc32c(&out[start..start + 28]);
    crc = crc32c::crc32c_append(crc, &out[start + FRAME_HEADER..]);
    out[start + 28..start + 32].copy_from_slice(&crc.to_be_bytes());
}

/// The payload size of `records` in a frame.
pub fn payload_len(records: &[&[u8]]) -> usize {
    records.iter().map(|r| 4 + r.len()).sum()
}

/// Decodes the frame at the start of `b`, expected to carry `lsn` (or any
/// LSN when `None`). `Err` says why the bytes are not a valid frame.
pub fn decode_frame(b: &[u8], offset: u64, lsn: Option<u64>) -> Result<Frame, String> {
    if b.len() < FRAME_HEADER {
        return Err(format!(
            "{} bytes remain, fewer than a frame header",
            b.len()
        ));
    }
    if be32(b, 0) != Some(FRAME_MAGIC) {
        return Err("no frame starts here (bad magic)".into());
    }
    let len = be32(b, 4).unwrap_or(0) as usize;
    if len > MAX_FRAME {
        return Err(format!(
            "the frame claims {len} bytes, over the {MAX_FRAME} limit"
        ));
    }
    let body = b
        .get(FRAME_HEADER..FRAME_HEADER + len)
        .ok_or_else(|| format!("the frame claims {len} bytes but the file ends first"))?;
    let crc = be32(b, 28).unwrap_or(0);
    let mut want = crc32c::crc32c(&b[..28]);
    want = crc32c::crc32c_append(want, body);
    if crc != want {
        return Err("the frame's checksum does not match".into());
    }
    let first = be64(b, 8).unwrap_or(0);
    if let Some(l) = lsn.filter(|l| *l != first) {
        return Err(format!(
            "the frame carries LSN {first} where LSN {l} was expected"
        ));
    }
    let synced = be64(b, 16).unwrap_or(0);
    let count = be32(b, 24).unwrap_or(0) as usize;
    // Each record takes at least its 4-byte length: bounds the allocation.
    if count > len / 4 {
        return Err(format!("the frame claims {count} records in {len} bytes"));
    }
    let mut records = Vec::with_capacity(count);
    let mut at = 0usize;
    for i in 0..count {
        let n = be32(body, at).ok_or_else(|| format!("record {i} of the frame is cut"))? as usize;
        let r = body
            .get(at + 4..at + 4 + n)
            .ok_or_else(|| format!("record {i} of the frame runs past the frame"))?;
        records.push(r.to_vec());
        at += 4 + n;
    }
    if at != len {
        return Err(format!(
            "the frame has {} bytes after its records",
            len - at
        ));
    }
    Ok(Frame {
        offset,
        lsn: first,
        synced,
        records,
        len: (FRAME_HEADER + len) as u64,
    })
}

/// What scanning a segment found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scan {
    /// The valid frames, in order.
    pub frames: Vec<Frame>,
    /// Offset just past the last valid frame.
    pub end: u64,
    /// The LSN after the last valid frame.
    pub next_lsn: u64,
    /// Where and why scanning stopped before the end of the bytes.
    pub stop: Option<(u64, String)>,
}

/// Scans a whole segment file's bytes. `Err` if the header is not valid.
pub fn scan_segment(b: &[u8]) -> Result<(u64, Scan), String> {
    let first = parse_segment_header(b)?;
    let mut frames = Vec::new();
    let mut at = SEGMENT_HEADER;
    let mut next = first;
    let mut stop = None;
    while at < b.len() {
        match decode_frame(&b[at..], at as u64, Some(next)) {
            Ok(f) => {
                next = f.lsn.saturating_add(f.records.len() as u64);
                at += f.len as usize;
                frames.push(f);
            }
            Err(why) => {
                // INVARIANT: a frame's first byte is its magic's, never
                // zero, so zeros to the end are preallocated space.
                if !b[at..].iter().all(|&x| x == 0) {
                    stop = Some((at as u64, why));
                }
                break;
            }
        }
    }
    Ok((
        first,
        Scan {
            frames,
            end: at as u64,
            next_lsn: next,
            stop,
        },
    ))
}

/// The first valid frame anywhere after `from` (any LSN): evidence that the
/// bytes at `from` were once synced if its `synced` is beyond them.
pub fn find_later_frame(b: &[u8], from: usize) -> Option<Frame> {
    let magic = FRAME_MAGIC.to_be_bytes();
    let mut at = from.saturating_add(1);
    while at + FRAME_HEADER <= b.len() {
        if b[at..at + 4] == magic {
            if let Ok(f) = decode_frame(&b[at..], at as u64, None) {
                return Some(f);
            }
        }
        at += 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_chain() {
        let mut seg = segment_header(7).to_vec();
        encode_frame(&mut seg, 7, 0, &[b"a", b""]);
        encode_frame(&mut seg, 9, 9, &[b"hello"]);
        let (first, s) = scan_segment(&seg).unwrap();
        assert_eq!(first, 7);
        assert_eq!(s.stop, None);
        assert_eq!(s.next_lsn, 10);
        assert_eq!(s.frames[0].records, vec![b"a".to_vec(), Vec::new()]);
        assert_eq!(s.frames[1].synced, 9);
        assert_eq!(s.end as usize, seg.len());
    }

    #[test]
    fn zeros_after_the_last_frame_are_a_clean_end_and_anything_else_is_not() {
        let mut seg = segment_header(0).to_vec();
        encode_frame(&mut seg, 0, 0, &[b"a"]);
        let end = seg.len();
        seg.resize(end + 4096, 0);
        let (_, s) = scan_segment(&seg).unwrap();
        assert_eq!((s.stop.clone(), s.end as usize, s.next_lsn), (None, end, 1));
        // A half-written frame in the preallocated space is not.
        let mut torn = seg.clone();
        let mut half = Vec::new();
        encode_frame(&mut half, 1, 0, &[b"cut short"]);
        torn[end..end + half.len() / 2].copy_from_slice(&half[..half.len() / 2]);
        let (_, s) = scan_segment(&torn).unwrap();
        assert_eq!(s.stop.map(|(o, _)| o as usize), Some(end));
        // Nor is one stray byte far into it.
        let mut stray = seg;
        stray[end + 4000] = 1;
        let (_, s) = scan_segment(&stray).unwrap();
        assert_eq!(s.stop.map(|(o, _)| o as usize), Some(end));
    }

    #[test]
    fn a_frame_with_the_wrong_lsn_stops_the_scan() {
        let mut seg = segment_header(0).to_vec();
        encode_frame(&mut seg, 0, 0, &[b"a"]);
        let at = seg.len();
        encode_frame(&mut seg, 5, 0, &[b"b"]);
        let (_, s) = scan_segment(&seg).unwrap();
        assert_eq!(s.frames.len(), 1);
        let (off, why) = s.stop.unwrap();
        assert_eq!(off as usize, at);
        assert!(why.contains("LSN 5"), "{why}");
    }
}
