//! PyTorch checkpoint containers, read through the restricted pickle VM in [`super::pickle`].
//!
//! - Legacy (torch < 1.6): five pickles back to back — magic number `0x1950a86a20f9469cfc6c`, protocol version
//!   (1001), sys info, the object, the list of storage keys — followed, for each key in that order, by a u64
//!   little-endian element count and the storage's raw bytes.
//! - Zip (torch ≥ 1.6): `<prefix>/data.pkl` holds the object, each storage is the member `<prefix>/data/<key>`, and
//!   `<prefix>/byteorder` (absent in old archives, meaning little) gives the byte order.
//!
//! In both, tensors are `_rebuild_tensor_v2(storage, offset, size, stride, ...)` descriptions that we gather into
//! dense row-major [`RawTensor`]s here.

use super::error::WeightsError;
use super::pickle::{ObjId, TensorRef, Unpickled, Value, unpickle};
use super::raw::{DType, RawTensor, TensorData};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{Cursor, Read};
use std::rc::Rc;

/// `0x1950a86a20f9469cfc6c` as the little-endian bytes pickle's LONG1 stores.
const LEGACY_MAGIC: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];
const LEGACY_PROTOCOL: i64 = 1001;
/// `data.pkl` holds names and shapes only; even huge models stay well under this.
const MAX_PICKLE_BYTES: u64 = 256 << 20;
/// Container keys that training scripts wrap a state dict in, in the order we prefer them. Plain weights come
/// before EMA copies so that the choice is the one `model.load_state_dict(ckpt["state_dict"])` users expect.
const NESTING_KEYS: [&str; 11] = [
    "state_dict",
    "model_state_dict",
    "model",
    "module",
    "net",
    "network",
    "state_dict_ema",
    "model_ema",
    "ema",
    "params",
    "weights",
];
const MAX_NESTING: usize = 4;

type NamedTensorRefs = Vec<(String, TensorRef)>;

/// Tensors found in a torch checkpoint, and the chain of container keys they were found under.
#[derive(Debug)]
pub(crate) struct TorchCheckpoint {
    pub tensors: BTreeMap<String, RawTensor>,
    pub container: Vec<String>,
}

pub(crate) fn read_legacy(bytes: &[u8]) -> Result<TorchCheckpoint, WeightsError> {
    // Running the VM (rather than matching bytes) accepts any pickle protocol torch.save was given, and reports a
    // hostile bare pickle as ForbiddenGlobal rather than as a format mismatch.
    let magic = unpickle(bytes, 0)?;
    match &magic.root {
        Value::BigInt(b) if **b == LEGACY_MAGIC => {}
        _ => {
            return Err(WeightsError::Malformed(
                "a pickle, but not a PyTorch checkpoint (no legacy magic number)".into(),
            ));
        }
    }
    let proto = unpickle(bytes, magic.end)?;
    match proto.root {
        Value::Int(LEGACY_PROTOCOL) => {}
        _ => {
            return Err(WeightsError::Malformed(format!(
                "legacy PyTorch protocol {} is not {LEGACY_PROTOCOL}",
                proto.describe(&proto.root)
            )));
        }
    }
    let sys = unpickle(bytes, proto.end)?;
    if let Some(items) = sys.dict(&sys.root) {
        let le = items.iter().find(|(k, _)| matches!(k, Value::Str(s) if &**s == "little_endian"));
        if let Some((_, Value::Bool(false))) = le {
            return Err(WeightsError::Malformed("big-endian legacy PyTorch files are not supported".into()));
        }
    }
    let main = unpickle(bytes, sys.end)?;
    let keys = unpickle(bytes, main.end)?;
    let key_list =
        keys.list(&keys.root).ok_or_else(|| WeightsError::Malformed("legacy storage key list is not a list".into()))?;

    // The data section gives only element counts, so each storage's dtype comes from the persistent ids.
    let mut dtypes: HashMap<Rc<str>, DType> = HashMap::new();
    for obj in &main.objs {
        if let super::pickle::Obj::Storage(s) = obj
            && dtypes.insert(s.key.clone(), s.dtype).is_some_and(|d| d != s.dtype)
        {
            return Err(WeightsError::Malformed(format!("storage {} is referenced with two dtypes", s.key)));
        }
    }

    let mut storages: HashMap<Rc<str>, &[u8]> = HashMap::new();
    let mut pos = keys.end;
    for key in key_list {
        let Value::Str(key) = key else {
            return Err(WeightsError::Malformed("legacy storage key is not a string".into()));
        };
        let dtype = *dtypes
            .get(key)
            .ok_or_else(|| WeightsError::Malformed(format!("storage {key} is listed but never referenced")))?;
        let count_bytes: [u8; 8] = bytes
            .get(pos..pos.saturating_add(8))
            .and_then(|s| s.try_into().ok())
            .ok_or_else(|| WeightsError::Malformed(format!("truncated before storage {key}")))?;
        pos += 8;
        let count = u64::from_le_bytes(count_bytes);
        let len = count
            .checked_mul(dtype.size() as u64)
            .and_then(|n| usize::try_from(n).ok())
            .filter(|&n| n <= bytes.len() - pos)
            .ok_or_else(|| {
                WeightsError::Malformed(format!("storage {key} claims {count} elements but the file is shorter"))
            })?;
        storages.insert(key.clone(), &bytes[pos..pos + len]);
        pos += len;
    }
    if pos != bytes.len() {
        tracing::debug!(trailing = bytes.len() - pos, "ignoring bytes after the last legacy storage");
    }

    let (container, refs) = locate_state_dict(&main)?;
    let mut budget = expansion_budget(bytes.len());
    let mut tensors = BTreeMap::new();
    for (name, t) in refs {
        let storage = storages
            .get(&t.storage.key)
            .ok_or_else(|| WeightsError::Malformed(format!("tensor {name}: storage {} has no data", t.storage.key)))?;
        let raw = materialize(&name, &t, storage, false, &mut budget)?;
        tensors.insert(name, raw);
    }
    Ok(TorchCheckpoint { tensors, container })
}

pub(crate) fn read_zip(bytes: &[u8]) -> Result<TorchCheckpoint, WeightsError> {
    let mut zip = zip::ZipArchive::new(Cursor::new(bytes)).map_err(WeightsError::Zip)?;
    // torch writes everything under one top-level folder named after the file; the pickle is `<folder>/data.pkl`.
    let pkl_name = zip
        .file_names()
        .find(|n| {
            n.strip_suffix("data.pkl")
                .is_some_and(|p| p.is_empty() || (p.ends_with('/') && p.matches('/').count() == 1))
        })
        .map(str::to_owned)
        .ok_or_else(|| WeightsError::Malformed("zip archive has no <name>/data.pkl (not a torch.save file?)".into()))?;
    let prefix = &pkl_name[..pkl_name.len() - "data.pkl".len()];

    let pkl = read_member(&mut zip, &pkl_name, MAX_PICKLE_BYTES, bytes.len())?;
    let big_endian = match zip.index_for_name(&format!("{prefix}byteorder")) {
        None => false,
        Some(_) => {
            let b = read_member(&mut zip, &format!("{prefix}byteorder"), 16, bytes.len())?;
            match b.as_slice() {
                b"little" => false,
                b"big" => true,
                other => {
                    return Err(WeightsError::Malformed(format!(
                        "unknown byteorder {:?}",
                        String::from_utf8_lossy(other)
                    )));
                }
            }
        }
    };

    let u = unpickle(&pkl, 0)?;
    let (container, refs) = locate_state_dict(&u)?;
    let mut loaded: HashMap<Rc<str>, Vec<u8>> = HashMap::new();
    let mut budget = expansion_budget(bytes.len());
    let mut tensors = BTreeMap::new();
    for (name, t) in refs {
        if !loaded.contains_key(&t.storage.key) {
            let expected = t
                .storage
                .numel
                .checked_mul(t.storage.dtype.size() as u64)
                .ok_or_else(|| WeightsError::Malformed(format!("tensor {name}: storage size overflows")))?;
            let member = format!("{prefix}data/{}", t.storage.key);
            let data = read_member(&mut zip, &member, expected, bytes.len())?;
            if (data.len() as u64) < expected {
                return Err(WeightsError::Malformed(format!(
                    "storage {member} has {} bytes but {expected} are declared",
                    data.len()
                )));
            }
            loaded.insert(t.storage.key.clone(), data);
        }
        let storage = loaded.get(&t.storage.key).map(Vec::as_slice).unwrap_or_default();
        let raw = materialize(&name, &t, storage, big_endian, &mut budget)?;
        tensors.insert(name, raw);
    }
    Ok(TorchCheckpoint { tensors, container })
}

/// Reads one archive member, refusing more than `limit` bytes. Members torch writes are stored uncompressed, but a
/// re-zipped file may deflate them; deflate cannot exceed ~1032:1, so a member claiming more than that is a bomb.
fn read_member(
    zip: &mut zip::ZipArchive<Cursor<&[u8]>>,
    name: &str,
    limit: u64,
    input_len: usize,
) -> Result<Vec<u8>, WeightsError> {
    let file = zip.by_name(name).map_err(WeightsError::Zip)?;
    let declared = file.size();
    if declared > limit {
        return Err(WeightsError::Malformed(format!("{name} is {declared} bytes, more than the {limit} expected")));
    }
    if file.compression() != zip::CompressionMethod::Stored
        && declared > file.compressed_size().saturating_mul(1032).saturating_add(1024)
    {
        return Err(WeightsError::Malformed(format!("{name} claims an impossible compression ratio")));
    }
    // Never pre-allocate from a declared size beyond what the input could hold; growth past it is then paid for
    // by real decompressed bytes.
    let mut buf = Vec::with_capacity(usize::try_from(declared).unwrap_or(usize::MAX).min(input_len));
    file.take(limit)
        .read_to_end(&mut buf)
        .map_err(|source| WeightsError::ZipMember { member: name.to_owned(), source })?;
    Ok(buf)
}

/// Total bytes of gathered tensor data we will produce from one file. Tensors sharing a storage, or with zero
/// strides (`expand`), legitimately exceed the file size, but not by much in practice; a hostile size/stride pair
/// could otherwise ask for terabytes from a few bytes of pickle.
fn expansion_budget(input_len: usize) -> u64 {
    (input_len as u64).saturating_mul(4).saturating_add(64 << 20)
}

/// Finds the dict of tensors in an unpickled checkpoint: the root itself, or under one of [`NESTING_KEYS`], or the
/// only child dict holding tensors. Non-tensor values beside the tensors (e.g. `_metadata`-like entries) are skipped.
fn locate_state_dict(u: &Unpickled) -> Result<(Vec<String>, NamedTensorRefs), WeightsError> {
    let mut path = Vec::new();
    let mut visited = HashSet::new();
    if let Some(found) = find_tensors(u, &u.root, 0, &mut path, &mut visited) {
        if !path.is_empty() {
            tracing::info!(container = %path.join("."), tensors = found.len(), "found the state dict inside a checkpoint container");
        }
        return Ok((path, found));
    }
    let keys = match u.dict(&u.root) {
        Some(items) => {
            let mut ks: Vec<String> = items.iter().take(20).map(|(k, _)| u.describe(k)).collect();
            if items.len() > 20 {
                ks.push(format!("… {} more", items.len() - 20));
            }
            ks.join(", ")
        }
        None => format!("none: the checkpoint holds a {}", u.describe(&u.root)),
    };
    Err(WeightsError::NoStateDict { keys })
}

/// `visited` makes every dict be searched at most once: pickles share objects through the memo, and without it a
/// small hostile file could make the search revisit one huge dict many times.
fn find_tensors(
    u: &Unpickled,
    v: &Value,
    depth: usize,
    path: &mut Vec<String>,
    visited: &mut HashSet<ObjId>,
) -> Option<NamedTensorRefs> {
    let Value::Obj(id) = v else { return None };
    let items = u.dict(v)?;
    if !visited.insert(*id) {
        return None;
    }
    let tensors: Vec<(String, TensorRef)> = items
        .iter()
        .filter_map(|(k, v)| match (k, u.tensor(v)) {
            (Value::Str(k), Some(t)) => Some((k.to_string(), t.clone())),
            _ => None,
        })
        .collect();
    if !tensors.is_empty() {
        let skipped = items.len() - tensors.len();
        if skipped > 0 {
            tracing::debug!(skipped, "ignoring non-tensor entries beside the tensors");
        }
        return Some(tensors);
    }
    if depth >= MAX_NESTING {
        return None;
    }
    let child = |name: &str| {
        // Later duplicates win, as in a Python dict.
        items.iter().rev().find(|(k, _)| matches!(k, Value::Str(s) if &**s == name)).map(|(_, v)| v)
    };
    for key in NESTING_KEYS {
        if let Some(c) = child(key) {
            path.push(key.to_owned());
            if let Some(found) = find_tensors(u, c, depth + 1, path, visited) {
                let others: Vec<&str> =
                    NESTING_KEYS.iter().copied().filter(|k| *k != key && child(k).is_some()).collect();
                if !others.is_empty() {
                    tracing::info!(chosen = key, ?others, "checkpoint has several candidate state dicts");
                }
                return Some(found);
            }
            path.pop();
        }
    }
    // Unknown wrapper key: accept it only when exactly one child dict directly holds tensors. Each distinct child
    // is scanned once however often it is referenced.
    let mut scanned = HashSet::new();
    let mut candidates = items.iter().filter_map(|(k, v)| match (k, v) {
        (Value::Str(k), Value::Obj(cid))
            if !visited.contains(cid)
                && scanned.insert(*cid)
                && u.dict(v).is_some_and(|d| d.iter().any(|(_, x)| u.tensor(x).is_some())) =>
        {
            Some((k, v))
        }
        _ => None,
    });
    let (Some((k, v)), None) = (candidates.next(), candidates.next()) else {
        return None;
    };
    path.push(k.to_string());
    let found = find_tensors(u, v, depth + 1, path, visited);
    if found.is_none() {
        path.pop();
    }
    found
}

/// Gathers a (possibly strided) tensor out of its storage bytes into a dense row-major tensor.
fn materialize(
    name: &str,
    t: &TensorRef,
    storage: &[u8],
    big_endian: bool,
    budget: &mut u64,
) -> Result<RawTensor, WeightsError> {
    let bad = |why: String| WeightsError::Malformed(format!("tensor {name}: {why}"));
    let selem = t.storage.dtype.size() as u64;
    let elem = t.dtype.size() as u64;
    // The declared storage, trimmed to what the file holds (checked by the callers to be at least as long).
    let declared = t.storage.numel.checked_mul(selem).ok_or_else(|| bad("storage size overflows".into()))?;
    let mut bytes = storage.get(..usize::try_from(declared).unwrap_or(usize::MAX)).unwrap_or(storage);
    if let Some((off, size)) = t.storage.view {
        let start = off.checked_mul(selem);
        let end = off.checked_add(size).and_then(|e| e.checked_mul(selem));
        bytes = match (start, end) {
            (Some(s), Some(e)) if e <= bytes.len() as u64 => &bytes[s as usize..e as usize],
            _ => return Err(bad("storage view lies outside its storage".into())),
        };
    }
    let available = bytes.len() as u64 / elem;

    let shape: Vec<usize> = t
        .size
        .iter()
        .map(|&s| usize::try_from(s).map_err(|_| bad("dimension too large".into())))
        .collect::<Result<_, _>>()?;
    let numel =
        t.size.iter().try_fold(1u64, |acc, &s| acc.checked_mul(s)).ok_or_else(|| bad("size overflows".into()))?;
    if numel == 0 {
        return Ok(RawTensor { shape, data: TensorData::decode(t.dtype, &[], big_endian) });
    }
    let last = t
        .size
        .iter()
        .zip(&t.stride)
        .try_fold(t.offset, |acc, (&s, &st)| (s - 1).checked_mul(st).and_then(|x| acc.checked_add(x)))
        .ok_or_else(|| bad("offset/stride overflow".into()))?;
    if last >= available {
        return Err(bad(format!("reads element {last} of a storage with {available}")));
    }
    let out_bytes = numel * elem; // ≤ available × elem ≤ input size unless strides repeat elements
    if out_bytes > *budget {
        return Err(bad("expands to more data than the file can reasonably describe".into()));
    }
    *budget -= out_bytes;

    let e = elem as usize;
    let contiguous = {
        let mut expect = 1u64;
        t.size.iter().zip(&t.stride).rev().all(|(&s, &st)| {
            let ok = s == 1 || st == expect;
            expect = expect.saturating_mul(s);
            ok
        })
    };
    let data = if contiguous {
        let start = t.offset as usize * e;
        TensorData::decode(t.dtype, &bytes[start..start + numel as usize * e], big_endian)
    } else {
        let mut out = Vec::with_capacity(out_bytes as usize);
        let mut index = vec![0u64; t.size.len()];
        for _ in 0..numel {
            let at = t.offset + index.iter().zip(&t.stride).map(|(i, s)| i * s).sum::<u64>();
            let at = at as usize * e;
            out.extend_from_slice(&bytes[at..at + e]);
            // Odometer increment, last dimension fastest (row-major).
            for d in (0..index.len()).rev() {
                index[d] += 1;
                if index[d] < t.size[d] {
                    break;
                }
                index[d] = 0;
            }
        }
        TensorData::decode(t.dtype, &out, big_endian)
    };
    Ok(RawTensor { shape, data })
}

#[cfg(test)]
mod tests {
    use super::super::pickle::StorageRef;
    use super::*;

    fn tref(size: Vec<u64>, stride: Vec<u64>, offset: u64, numel: u64) -> TensorRef {
        TensorRef {
            storage: StorageRef { key: "0".into(), dtype: DType::F32, numel, view: None },
            dtype: DType::F32,
            offset,
            size,
            stride,
        }
    }

    fn bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn gathers_transposed_and_offset_views() {
        let s = bytes(&(0..12).map(|i| i as f32).collect::<Vec<_>>());
        let mut budget = 1 << 20;
        // arange(12).reshape(3, 4).t()
        let t = materialize("t", &tref(vec![4, 3], vec![1, 4], 0, 12), &s, false, &mut budget).unwrap();
        assert_eq!(t.shape, vec![4, 3]);
        assert_eq!(t.data, TensorData::F32(vec![0., 4., 8., 1., 5., 9., 2., 6., 10., 3., 7., 11.]));
        let v = materialize("v", &tref(vec![2, 3], vec![3, 1], 5, 12), &s, false, &mut budget).unwrap();
        assert_eq!(v.data, TensorData::F32(vec![5., 6., 7., 8., 9., 10.]));
        // Zero stride (expand) repeats elements.
        let x = materialize("x", &tref(vec![3], vec![0], 2, 12), &s, false, &mut budget).unwrap();
        assert_eq!(x.data, TensorData::F32(vec![2., 2., 2.]));
    }

    #[test]
    fn rejects_out_of_bounds_and_runaway_sizes() {
        let s = bytes(&[0.0; 4]);
        let mut budget = 1 << 20;
        assert!(materialize("a", &tref(vec![5], vec![1], 0, 4), &s, false, &mut budget).is_err());
        assert!(materialize("b", &tref(vec![2], vec![1], 3, 4), &s, false, &mut budget).is_err());
        assert!(materialize("c", &tref(vec![u64::MAX, 2], vec![0, 1], 0, 4), &s, false, &mut budget).is_err());
        assert!(materialize("d", &tref(vec![1 << 40], vec![0], 0, 4), &s, false, &mut budget).is_err());
        assert!(materialize("e", &tref(vec![2, 2], vec![u64::MAX, 1], 0, 4), &s, false, &mut budget).is_err());
    }
}
