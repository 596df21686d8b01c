//! Struct layouts from BTF, to check the Rust mirrors against the C (style habit 1).
//!
//! A small reader of the `.BTF` section of a BPF object: enough to list every named struct with
//! its size and its members' names, byte offsets and sizes. aya-obj 0.3 parses BTF too but keeps
//! struct members private, hence this reader (about as long as the glue it would need).

use std::collections::BTreeMap;

use object::{Object as _, ObjectSection as _};

/// The layout of one struct: as the C compiler laid it out (from BTF) or as Rust did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StructLayout {
    pub name: String,
    pub size: usize,
    pub fields: Vec<FieldLayout>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldLayout {
    pub name: String,
    pub offset: usize,
    pub size: usize,
}

/// The size of a field, for `rust_layout!`.
pub fn field_size<T, F>(_: fn(&T) -> &F) -> usize {
    size_of::<F>()
}

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("not an ELF object: {0}")]
    Elf(#[from] object::Error),
    #[error("the object has no .BTF section (compiled without -g?)")]
    NoBtf,
    #[error("malformed BTF: {0}")]
    Malformed(&'static str),
}

const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FWD: u32 = 7;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_FLOAT: u32 = 16;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

struct Ty {
    name_off: u32,
    kind: u32,
    kind_flag: bool,
    size_or_type: u32,
    /// ARRAY: (elem type, nelems). STRUCT/UNION: members (name_off, type, bit offset).
    array: Option<(u32, u32)>,
    members: Vec<(u32, u32, u32)>,
}

/// Every named struct in the object's BTF, by name.
pub fn btf_structs(elf: &[u8]) -> Result<BTreeMap<String, StructLayout>, BtfError> {
    let file = object::File::parse(elf)?;
    let section = file.section_by_name(".BTF").ok_or(BtfError::NoBtf)?;
    let btf = section.data()?;
    parse(btf)
}

fn u32_at(b: &[u8], off: usize) -> Result<u32, BtfError> {
    let s = b
        .get(off..off + 4)
        .ok_or(BtfError::Malformed("truncated"))?;
    Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

fn parse(b: &[u8]) -> Result<BTreeMap<String, StructLayout>, BtfError> {
    let magic = b.get(0..2).ok_or(BtfError::Malformed("truncated header"))?;
    if magic != [0x9f, 0xeb] {
        return Err(BtfError::Malformed("bad magic (or big-endian BTF)"));
    }
    let hdr_len = u32_at(b, 4)? as usize;
    let type_off = u32_at(b, 8)? as usize;
    let type_len = u32_at(b, 12)? as usize;
    let str_off = u32_at(b, 16)? as usize;
    let str_len = u32_at(b, 20)? as usize;
    let types = b
        .get(hdr_len + type_off..hdr_len + type_off + type_len)
        .ok_or(BtfError::Malformed("type section out of bounds"))?;
    let strings = b
        .get(hdr_len + str_off..hdr_len + str_off + str_len)
        .ok_or(BtfError::Malformed("string section out of bounds"))?;

    // Type ids start at 1; index 0 is `void`.
    let mut tys: Vec<Option<Ty>> = vec![None];
    let mut off = 0;
    while off < types.len() {
        let name_off = u32_at(types, off)?;
        let info = u32_at(types, off + 4)?;
        let size_or_type = u32_at(types, off + 8)?;
        off += 12;
        let vlen = (info & 0xffff) as usize;
        let kind = (info >> 24) & 0x1f;
        let mut ty = Ty {
            name_off,
            kind,
            kind_flag: info >> 31 == 1,
            size_or_type,
            array: None,
            members: Vec::new(),
        };
        match kind {
            KIND_INT | KIND_VAR | KIND_DECL_TAG => off += 4,
            KIND_ARRAY => {
                ty.array = Some((u32_at(types, off)?, u32_at(types, off + 8)?));
                off += 12;
            }
            KIND_STRUCT | KIND_UNION => {
                for _ in 0..vlen {
                    ty.members.push((
                        u32_at(types, off)?,
                        u32_at(types, off + 4)?,
                        u32_at(types, off + 8)?,
                    ));
                    off += 12;
                }
            }
            KIND_ENUM | KIND_FUNC_PROTO => off += 8 * vlen,
            KIND_DATASEC | KIND_ENUM64 => off += 12 * vlen,
            KIND_PTR | KIND_FWD | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT
            | KIND_FUNC | KIND_FLOAT | KIND_TYPE_TAG => {}
            _ => return Err(BtfError::Malformed("unknown BTF kind")),
        }
        tys.push(Some(ty));
    }

    let name = |off: u32| -> Result<String, BtfError> {
        let s = strings
            .get(off as usize..)
            .ok_or(BtfError::Malformed("bad string offset"))?;
        let end = s.iter().position(|c| *c == 0).unwrap_or(s.len());
        Ok(String::from_utf8_lossy(&s[..end]).into_owned())
    };

    let mut out = BTreeMap::new();
    for ty in tys.iter().flatten() {
        if ty.kind != KIND_STRUCT || ty.name_off == 0 {
            continue;
        }
        let mut fields = Vec::new();
        for &(m_name, m_type, m_off) in &ty.members {
            // With kind_flag the offset word is (bitfield size << 24 | bit offset).
            let bits = if ty.kind_flag {
                m_off & 0x00ff_ffff
            } else {
                m_off
            };
            fields.push(FieldLayout {
                name: name(m_name)?,
                offset: (bits / 8) as usize,
                size: type_size(&tys, m_type, 0)?,
            });
        }
        let layout = StructLayout {
            name: name(ty.name_off)?,
            size: ty.size_or_type as usize,
            fields,
        };
        out.insert(layout.name.clone(), layout);
    }
    Ok(out)
}

fn type_size(tys: &[Option<Ty>], id: u32, depth: u32) -> Result<usize, BtfError> {
    if depth > 32 {
        return Err(BtfError::Malformed("type chain too deep"));
    }
    let ty = tys
        .get(id as usize)
        .and_then(Option::as_ref)
        .ok_or(BtfError::Malformed("bad type id"))?;
    match ty.kind {
        KIND_INT | KIND_STRUCT | KIND_UNION | KIND_ENUM | KIND_ENUM64 | KIND_FLOAT => {
            Ok(ty.size_or_type as usize)
        }
        KIND_PTR => Ok(8),
        KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
            type_size(tys, ty.size_or_type, depth + 1)
        }
        KIND_ARRAY => {
            let (elem, n) = ty.array.ok_or(BtfError::Malformed("array without data"))?;
            Ok(type_size(tys, elem, depth + 1)? * n as usize)
        }
        _ => Err(BtfError::Malformed("member of a type without size")),
    }
}
