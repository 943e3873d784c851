//! Is this phone number valid for its country? Fast, for strict E.164.
//!
//! [`is_valid`] answers exactly what
//! `phonenumber::parse(None, p).map(|n| phonenumber::is_valid(&n))` answers
//! (an error counting as "not valid"), for every input. Inputs of the shape
//! `+` then 7 to 15 ASCII digits — all the API lets through — take a fast
//! path; anything else goes to the crate itself.
//!
//! Why not just call the crate: its general parser (nom, Unicode
//! normalisation, extension and RFC 3966 handling) is wasted on an input
//! that is already strict E.164, and every one of its metadata regexes is a
//! `regex_cache::CachedRegex`: each match locks one process-wide mutex,
//! SipHashes the whole pattern source (hundreds of bytes) and refreshes an
//! LRU of 100 entries. Profiled, the crate call was over half of the
//! create handler, and the LRU lookup alone over a quarter; the matching
//! proper, a tenth.
//!
//! The fast path replays the crate's own steps — country calling code,
//! region choice (`validator::source_for`), national-prefix stripping
//! (`parser::helper::national_number` plus the second strip in
//! `parser::parse_with`), the too-short rule (`validator::length`), the
//! `NationalNumber` round trip, then `validator::number_type` — on the
//! crate's metadata database ([`DATABASE`]): the same regions in the same
//! order, the same pattern sources and possible lengths. Only the regex
//! objects are ours, compiled from the crate's pattern sources, each once,
//! on first use (so the cache is bounded by the ~1,600 patterns of the
//! metadata, about 10 MB if every country were used).
//!
//! Two mechanical changes to those patterns, both exact on our input:
//! - The crate tests `re.find(s).start() == 0`. Leftmost-first search
//!   returns a match at 0 whenever one exists, so that is `^(?:re)`
//!   matching; we compile the anchored form and skip the scan.
//! - The haystack is only ever ASCII (E.164 digits, or digits spliced by a
//!   transform rule), on which Unicode and ASCII classes (`\d`) agree, so
//!   the patterns are compiled as byte regexes without Unicode tables:
//!   ~5x faster to build and ~9x smaller.
//!
//! The tests in this module compare the two on every country calling code
//! in the metadata, with random, example-based and mutated numbers.

use phonenumber::country;
use phonenumber::metadata::{Database, Descriptor, Metadata, DATABASE};
use regex::bytes::{Regex, RegexBuilder};
use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{LazyLock, OnceLock};

/// `phonenumber::parse(None, phone)` then `phonenumber::is_valid`, with an
/// error meaning "not valid"; fast when `phone` is `+` then 7 to 15 digits.
pub fn is_valid(phone: &str) -> bool {
    match phone.strip_prefix('+') {
        Some(d) if (7..=15).contains(&d.len()) && d.bytes().all(|b| b.is_ascii_digit()) => {
            match TABLE.check(d.as_bytes()) {
                Ok(valid) => valid,
                Err(Fallback) => crate_is_valid(phone),
            }
        }
        _ => crate_is_valid(phone),
    }
}

/// The reference: what the crate says.
pub fn crate_is_valid(phone: &str) -> bool {
    phonenumber::parse(None, phone)
        .map(|n| phonenumber::is_valid(&n))
        .unwrap_or(false)
}

/// Decodes the crate's metadata and builds the region table now (~0.3 s
/// of CPU, the crate's own decoding mostly) rather than in the first
/// request that needs them. Patterns still compile on first use.
pub fn init() {
    LazyLock::force(&TABLE);
}

/// Builds the region table and compiles every pattern now rather than on
/// first use (~0.1 s of CPU, ~10 MB). Returns how many patterns failed to
/// compile — numbers that need one go to the crate's slow path.
pub fn warm_all() -> usize {
    TABLE.rules.iter().map(Rules::warm).sum()
}

/// The fast path cannot decide this number: ask the crate. Only when a
/// pattern fails to compile or the metadata has a shape the crate itself
/// would panic on; neither happens with the bundled metadata (tested).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fallback;

/// Longest national significant number the crate accepts
/// (`consts::MAX_LENGTH_FOR_NSN`, private there) and the shortest.
const MAX_NSN: usize = 17;
const MIN_NSN: usize = 2;

/// `NationalNumber::new` refuses values from 2^56 up.
const NATIONAL_VALUE_LIMIT: u64 = 1 << 56;

static TABLE: LazyLock<Table> = LazyLock::new(|| Table::build(&DATABASE));

/// A pattern from the metadata, compiled the first time it is needed.
struct LazyRegex {
    src: &'static str,
    re: OnceLock<Option<Regex>>,
}

impl LazyRegex {
    fn new(src: &'static str) -> Self {
        LazyRegex {
            src,
            re: OnceLock::new(),
        }
    }

    fn get(&self) -> Result<&Regex, Fallback> {
        self.re
            .get_or_init(|| compile(self.src))
            .as_ref()
            .ok_or(Fallback)
    }

    /// The crate's `re.find(s).map(|m| m.start() == 0)`.
    fn matches_at_start(&self, s: &[u8]) -> Result<bool, Fallback> {
        Ok(self.get()?.is_match(s))
    }
}

/// Anchored at the start (see the module docs); the `\n` closes any `#`
/// comment the pattern might end with under `(?x)`, which the crate sets
/// (`ignore_whitespace(true)`) on every metadata regex.
fn compile(src: &str) -> Option<Regex> {
    let anchored = format!("^(?:{src}\n)");
    RegexBuilder::new(&anchored)
        .ignore_whitespace(true)
        .unicode(false)
        .build()
        // A pattern needing Unicode mode: a bytes regex with Unicode on is
        // the crate's str regex, exactly.
        .or_else(|_| RegexBuilder::new(&anchored).ignore_whitespace(true).build())
        .ok()
}

/// One `Descriptor`: `Descriptor::is_match`.
struct Desc {
    lengths: &'static [u16],
    re: LazyRegex,
}

impl Desc {
    fn new(d: &'static Descriptor) -> Self {
        Desc {
            lengths: d.possible_length(),
            re: LazyRegex::new(d.national_number().as_str()),
        }
    }

    fn is_match(&self, s: &[u8]) -> Result<bool, Fallback> {
        // The crate compares `value.len() as u16`; NSNs are at most 17.
        let len = s.len() as u16;
        if !self.lengths.is_empty() && !self.lengths.contains(&len) {
            return Ok(false);
        }
        self.re.matches_at_start(s)
    }
}

/// What the fast path needs of one `Metadata`.
struct Rules {
    general: Desc,
    general_local_lengths: &'static [u16],
    /// The descriptors `validator::number_type` tries after the general
    /// one. Any match makes the type known; their order only matters for
    /// which type, so the common ones go first.
    types: Vec<Desc>,
    leading_digits: Option<LazyRegex>,
    national_prefix: Option<&'static str>,
    prefix_for_parsing: Option<LazyRegex>,
    transform: Option<&'static str>,
}

impl Rules {
    fn new(m: &'static Metadata) -> Self {
        let d = m.descriptors();
        let types = [
            d.mobile(),
            d.fixed_line(),
            d.toll_free(),
            d.premium_rate(),
            d.shared_cost(),
            d.voip(),
            d.personal_number(),
            d.pager(),
            d.uan(),
            d.voicemail(),
        ];
        Rules {
            general: Desc::new(d.general()),
            general_local_lengths: d.general().possible_local_length(),
            types: types.into_iter().flatten().map(Desc::new).collect(),
            leading_digits: m.leading_digits().map(|r| LazyRegex::new(r.as_str())),
            national_prefix: m.national_prefix(),
            prefix_for_parsing: m
                .national_prefix_for_parsing()
                .map(|r| LazyRegex::new(r.as_str())),
            transform: m.national_prefix_transform_rule(),
        }
    }

    fn warm(&self) -> usize {
        let descs = std::iter::once(&self.general).chain(&self.types);
        descs
            .map(|d| &d.re)
            .chain(&self.leading_digits)
            .chain(&self.prefix_for_parsing)
            .filter(|r| r.get().is_err())
            .count()
    }

    /// `validator::number_type(meta, s) != Type::Unknown`.
    fn type_known(&self, s: &[u8]) -> Result<bool, Fallback> {
        if !self.general.is_match(s)? {
            return Ok(false);
        }
        for d in &self.types {
            if d.is_match(s)? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// `parser::helper::national_number`: strip the national prefix (or
    /// apply the transform rule), keeping the number when that would make
    /// it no longer match the general pattern.
    fn national_number<'a>(&self, national: &'a [u8]) -> Result<Cow<'a, [u8]>, Fallback> {
        let Some(parsing) = &self.prefix_for_parsing else {
            if let Some(p) = self.national_prefix {
                if let Some(rest) = national.strip_prefix(p.as_bytes()) {
                    return Ok(Cow::Borrowed(rest));
                }
            }
            return Ok(Cow::Borrowed(national));
        };
        let re = parsing.get()?;
        // Anchored: a match here is the crate's "found, at index 0".
        let Some(caps) = re.captures(national) else {
            return Ok(Cow::Borrowed(national));
        };
        let end = caps.get(0).map_or(0, |m| m.end());
        // The crate's `last`: the highest-numbered group (group 0 when
        // there are none), `None` when it did not take part.
        let last = caps.get(caps.len() - 1);
        match (self.transform, last) {
            (Some(rule), Some(_)) => {
                let viable = self.general.is_match(national)?;
                let transformed = re.replace(national, rule.as_bytes()).into_owned();
                if viable && !self.general.is_match(&transformed)? {
                    return Ok(Cow::Borrowed(national));
                }
                Ok(Cow::Owned(transformed))
            }
            // The crate's guard here re-tests the general pattern on
            // `national[start..]` with start == 0, i.e. on the unchanged
            // number, so it can never keep it: the prefix always goes.
            _ => Ok(Cow::Borrowed(&national[end..])),
        }
    }

    /// `validator::length(meta, n, Type::Unknown) == Validation::TooShort`:
    /// the Unknown descriptor is the general one, whose possible lengths
    /// are used whether or not they are empty (the crate's two branches
    /// pick the same list); lengths are assumed sorted, as there.
    fn too_short(&self, len: usize) -> bool {
        let possible = self.general.lengths;
        let len = len as u16;
        match possible.first() {
            None => false,
            Some(&min) => !self.general_local_lengths.contains(&len) && len < min,
        }
    }
}

/// Where the crate's `source_for` lands for one region of a shared code.
struct Candidate {
    /// The metadata tested: `database.by_id(region)`.
    test: usize,
    /// The metadata picked: `database.by_id(region.parse::<Id>().as_ref())`.
    pick: Option<usize>,
}

/// The region `source_for` settled on.
struct Source<'a> {
    rules: &'a Rules,
    /// It was picked because its patterns give this very number a known
    /// type: `number_type` on the same number needs no second run.
    type_known: bool,
}

/// One country calling code.
enum Code {
    /// One region: `source_for` picks it without testing the number
    /// (`None`: its id is not a `country::Id`, so the crate finds no
    /// metadata at all).
    Single(Option<usize>),
    /// Several (+1, +7, +44, ...): the first, in the crate's order (main
    /// country first), whose leading digits match the start of the number
    /// or, without leading digits, whose patterns give it a known type.
    Shared(Vec<Candidate>),
    /// A metadata shape the crate would panic on: leave it to the crate.
    Unsupported,
}

struct Table {
    /// Indexed by country calling code (1 to 3 digits).
    codes: Vec<Option<Code>>,
    rules: Vec<Rules>,
}

impl Table {
    fn build(db: &'static Database) -> Table {
        let mut rules = Vec::new();
        let mut index: HashMap<*const Metadata, usize> = HashMap::new();
        let mut rules_of = |m: &'static Metadata| -> usize {
            *index.entry(m as *const Metadata).or_insert_with(|| {
                rules.push(Rules::new(m));
                rules.len() - 1
            })
        };
        let by_id_parsed = |region: &str| {
            region
                .parse::<country::Id>()
                .ok()
                .map(|id| db.by_id(id.as_ref()))
        };
        let mut codes = Vec::with_capacity(1000);
        for code in 0..1000u16 {
            let entry = db.region(&code).map(|regions| match regions.as_slice() {
                ["001"] => match db.by_code(&code).and_then(|ms| ms.first().copied()) {
                    Some(m) => Code::Single(Some(rules_of(m))),
                    None => Code::Single(None),
                },
                [region] => match by_id_parsed(region) {
                    // Parsed, but no metadata under that id.
                    Some(None) => Code::Single(None),
                    Some(Some(m)) => Code::Single(Some(rules_of(m))),
                    None => Code::Single(None),
                },
                regions => {
                    let mut candidates = Vec::with_capacity(regions.len());
                    for region in regions {
                        // The crate unwraps both lookups here.
                        let (Some(test), Some(pick)) = (db.by_id(*region), by_id_parsed(region))
                        else {
                            return Code::Unsupported;
                        };
                        candidates.push(Candidate {
                            test: rules_of(test),
                            pick: pick.map(&mut rules_of),
                        });
                    }
                    Code::Shared(candidates)
                }
            });
            codes.push(entry);
        }
        Table { codes, rules }
    }

    /// `validator::source_for`, then the metadata lookup its callers do.
    fn source_for(&self, code: &Code, national: &[u8]) -> Result<Option<Source<'_>>, Fallback> {
        match code {
            Code::Single(idx) => Ok(idx.map(|i| Source {
                rules: &self.rules[i],
                type_known: false,
            })),
            Code::Unsupported => Err(Fallback),
            Code::Shared(candidates) => {
                for c in candidates {
                    let r = &self.rules[c.test];
                    let (hit, type_known) = match &r.leading_digits {
                        Some(ld) => (ld.matches_at_start(national)?, false),
                        None => {
                            let known = r.type_known(national)?;
                            (known, known)
                        }
                    };
                    if hit {
                        return Ok(c.pick.map(|i| Source {
                            rules: &self.rules[i],
                            type_known: type_known && i == c.test,
                        }));
                    }
                }
                Ok(None)
            }
        }
    }

    /// The crate's answer for `+` followed by `digits` (7 to 15 ASCII
    /// digits).
    fn check(&self, digits: &[u8]) -> Result<bool, Fallback> {
        // parser::helper::country_code: no calling code starts with 0, and
        // the first 1-, 2- or 3-digit prefix known to the metadata wins.
        if digits.first() == Some(&b'0') {
            return Ok(false);
        }
        let found = (1..=3).find_map(|len| {
            let cc = digits[..len]
                .iter()
                .fold(0usize, |acc, b| acc * 10 + usize::from(b - b'0'));
            self.codes[cc].as_ref().map(|code| (len, code))
        });
        let Some((cc_len, code)) = found else {
            return Ok(false);
        };
        let rest = &digits[cc_len..];

        // parser::parse_with: the region is chosen on the number without
        // leading zeros; its national prefix is stripped (twice, as there)
        // unless that leaves a number too short for the region.
        let zeros = rest.iter().take_while(|&&b| b == b'0').count();
        let region_input = &rest[zeros..];
        let first = self.source_for(code, region_input)?;
        let mut national = Cow::Borrowed(rest);
        if let Some(Source { rules, .. }) = first {
            let mut potential = rules.national_number(rest)?;
            if let Some(p) = rules.national_prefix {
                if potential.starts_with(p.as_bytes()) {
                    potential = match potential {
                        Cow::Borrowed(s) => Cow::Borrowed(&s[p.len()..]),
                        Cow::Owned(mut s) => {
                            s.drain(..p.len());
                            Cow::Owned(s)
                        }
                    };
                }
            }
            if !rules.too_short(potential.len()) {
                national = potential;
            }
        }
        if !(MIN_NSN..=MAX_NSN).contains(&national.len()) {
            return Ok(false);
        }

        // NationalNumber: leading zeros counted, the rest as a u64 (which
        // must exist and stay under 2^56); is_valid_with then works on its
        // Display form — the same digits when they are all digits.
        let zeros = national.iter().take_while(|&&b| b == b'0').count();
        let value = std::str::from_utf8(&national[zeros..])
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .filter(|&v| v < NATIONAL_VALUE_LIMIT);
        let Some(value) = value else {
            return Ok(false);
        };
        if !national.iter().all(u8::is_ascii_digit) {
            // Only a transform rule could splice a non-digit in; rebuild the
            // text the crate would print.
            national = Cow::Owned(format!("{}{value}", "0".repeat(zeros)).into_bytes());
        }

        // validator::is_valid_with: the region again, this time on the
        // number with its leading zeros, then its type. Both are pure
        // functions of the digits, so when nothing was stripped and there
        // were no leading zeros (most numbers) the first answer stands.
        let last = if *national == *region_input {
            first
        } else {
            self.source_for(code, &national)?
        };
        match last {
            Some(Source {
                type_known: true, ..
            }) => Ok(true),
            Some(Source { rules, .. }) => rules.type_known(&national),
            None => Ok(false),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// The fast path's own answer, insisting it did not fall back.
    fn fast(phone: &str) -> bool {
        let d = phone.strip_prefix('+').expect("test numbers start with +");
        TABLE
            .check(d.as_bytes())
            .unwrap_or_else(|_| panic!("{phone}: fell back to the crate"))
    }

    /// Asserts both agree; returns the answer.
    fn assert_same(phone: &str) -> bool {
        let answer = fast(phone);
        assert_eq!(
            answer,
            crate_is_valid(phone),
            "{phone}: fast path and crate disagree"
        );
        answer
    }

    #[test]
    fn named_cases() {
        for (phone, valid) in [
            // UK mobile.
            ("+447911123456", true),
            // Ofcom's drama range: reserved, never assigned.
            ("+447700900123", false),
            // UK mobile one digit short / long.
            ("+44791112345", false),
            ("+4479111234567", false),
            // US (Mountain View) and a Canadian (Toronto) number: +1 is
            // shared, Canada is found after the US patterns fail; area
            // code 111 does not exist.
            ("+16502530000", true),
            ("+14163492000", true),
            ("+11115550123", false),
            ("+12530000", false),
            // +7 shared by Russia (leading digits 3, 4, 8, 9) and
            // Kazakhstan (7): Moscow, a Russian mobile, Astana, a Kazakh
            // mobile, Moscow one digit short.
            ("+74957397000", true),
            ("+79161234567", true),
            ("+77172580000", true),
            ("+77012345678", true),
            ("+7495739700", false),
            // A quirk of the crate, kept on purpose: Russia's national
            // prefix is 8, which it strips from +7 800 ... too, leaving a
            // number no +7 region claims; libphonenumber would accept it.
            ("+78005553535", false),
            // Italy: the leading 0 belongs to the number (Milan, Rome);
            // a mobile has none.
            ("+390236618300", true),
            ("+390669812345", true),
            ("+393123456789", true),
            // Argentina: "11 15 ..." reads like a mobile dialled nationally
            // (area code, then 15), which the transform rule rewrites to
            // 9 11 ...; the result fails the general pattern, so the crate
            // keeps the number as given — a Buenos Aires fixed line.
            ("+541115589377", true),
            ("+5491123456789", true),
            // Germany, France, New Zealand, Japan, India, Brazil.
            ("+4930123456", true),
            ("+33612345678", true),
            ("+6421387835", true),
            ("+81312345678", true),
            ("+919876543210", true),
            ("+5511912345678", true),
            // Non-geographic: +800 freephone, +979 premium.
            ("+80012345678", true),
            ("+800123456789", false),
            ("+979123456789", true),
            // No such calling code.
            ("+9991234567", false),
            // Too short / too long for anyone.
            ("+4412345", false),
            ("+441234567890123", false),
        ] {
            assert_eq!(crate_is_valid(phone), valid, "{phone}: the crate's answer");
            assert_eq!(fast(phone), valid, "{phone}: fast path");
            assert_eq!(is_valid(phone), valid, "{phone}: is_valid");
        }
    }

    #[test]
    fn every_pattern_compiles_and_no_code_falls_back() {
        assert_eq!(warm_all(), 0);
        for (cc, code) in TABLE.codes.iter().enumerate() {
            assert!(
                !matches!(code, Some(Code::Unsupported)),
                "+{cc} is left to the crate"
            );
        }
    }

    /// Example numbers of every type of every region (valid by design),
    /// with the region's national prefix, plus variants that walk the
    /// edges: national prefix or zeros put in front, a digit added or
    /// dropped, the last digits randomised, Argentina's mobile "15" put
    /// after the first digits.
    fn seeds() -> Vec<(u16, String, Option<&'static str>)> {
        let mut out = Vec::new();
        for m in DATABASE.iter() {
            let d = m.descriptors();
            let all = [
                Some(d.general()),
                d.fixed_line(),
                d.mobile(),
                d.toll_free(),
                d.premium_rate(),
                d.shared_cost(),
                d.personal_number(),
                d.voip(),
                d.pager(),
                d.uan(),
                d.voicemail(),
                d.emergency(),
                d.short_code(),
                d.standard_rate(),
                d.carrier(),
                d.no_international(),
            ];
            let np = m.national_prefix();
            for ex in all.into_iter().flatten().filter_map(|d| d.example()) {
                out.push((m.country_code(), ex.to_string(), np));
                if let Some(p) = np {
                    out.push((m.country_code(), format!("{p}{ex}"), np));
                    out.push((m.country_code(), format!("{p}{p}{ex}"), np));
                }
            }
        }
        out
    }

    fn digits(rng: &mut StdRng, n: usize) -> String {
        (0..n)
            .map(|_| char::from(b'0' + rng.gen_range(0..10)))
            .collect()
    }

    #[test]
    fn same_as_crate_on_examples_and_mutations() {
        let mut rng = StdRng::seed_from_u64(0xf1a5);
        let rounds = if cfg!(debug_assertions) { 2 } else { 12 };
        let (mut checked, mut valid) = (0, 0);
        for (cc, ex, np) in seeds() {
            let mut variants = vec![
                ex.clone(),
                format!("0{ex}"),
                format!("{ex}{}", digits(&mut rng, 1)),
                ex[..ex.len().saturating_sub(1)].to_string(),
            ];
            for k in 1..ex.len().min(5) {
                variants.push(format!("{}15{}", &ex[..k], &ex[k..]));
                variants.push(format!(
                    "{}15{}",
                    &ex[..k],
                    &ex[k..ex.len().saturating_sub(2).max(k)]
                ));
            }
            if let Some(p) = np {
                let keep = rng.gen_range(0..=ex.len());
                let tail = ex.len() - keep;
                variants.push(format!("{p}{}{}", &ex[..keep], digits(&mut rng, tail)));
            }
            for _ in 0..rounds {
                // Keep a random-length head of the example, randomise the tail.
                let keep = rng.gen_range(0..=ex.len());
                let extra = rng.gen_range(0..=3);
                let tail = (ex.len() - keep + extra).saturating_sub(rng.gen_range(0..=2));
                variants.push(format!("{}{}", &ex[..keep], digits(&mut rng, tail)));
            }
            for national in variants {
                let phone = format!("+{cc}{national}");
                let n = phone.len() - 1;
                if (7..=15).contains(&n) {
                    valid += usize::from(assert_same(&phone));
                    checked += 1;
                }
            }
        }
        // Both answers must be well represented for the comparison to mean
        // anything.
        assert!(checked > 10_000, "only {checked} numbers checked");
        assert!(
            valid > checked / 5 && valid < checked * 4 / 5,
            "{valid} of {checked} valid"
        );
        eprintln!("examples: {valid} of {checked} valid");
    }

    /// Every calling code in the metadata, every national length that
    /// fits E.164, random digits (mostly invalid, which is the point: the
    /// refusals must match too) and random digits after the code's most
    /// common leading digits.
    #[test]
    fn same_as_crate_on_random_numbers_of_every_code_and_length() {
        let mut rng = StdRng::seed_from_u64(0xe164);
        let per_length = if cfg!(debug_assertions) { 6 } else { 60 };
        let mut codes: Vec<u16> = DATABASE.iter().map(|m| m.country_code()).collect();
        codes.sort_unstable();
        codes.dedup();
        assert!(codes.len() > 200, "metadata has {} codes", codes.len());
        let (mut checked, mut valid) = (0, 0);
        for cc in codes {
            let cc = cc.to_string();
            for total in 7..=15usize {
                let Some(n) = total.checked_sub(cc.len()).filter(|&n| n > 0) else {
                    continue;
                };
                for _ in 0..per_length {
                    valid += usize::from(assert_same(&format!("+{cc}{}", digits(&mut rng, n))));
                    checked += 1;
                }
            }
        }
        assert!(checked > 50_000, "only {checked} numbers checked");
        assert!(valid > checked / 50, "{valid} of {checked} valid");
        eprintln!("random: {valid} of {checked} valid");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(
            if cfg!(debug_assertions) { 500 } else { 5000 }
        ))]

        #[test]
        fn prop_same_as_crate_on_e164(phone in r"\+[1-9][0-9]{6,14}") {
            prop_assert_eq!(fast(&phone), crate_is_valid(&phone), "{}", phone);
        }

        /// Leading zeros after the calling code, national prefixes, short
        /// codes: digits drawn from a small alphabet hit them more often.
        #[test]
        fn prop_same_as_crate_on_e164_small_alphabet(phone in r"\+[1-9][0178]{6,14}") {
            prop_assert_eq!(fast(&phone), crate_is_valid(&phone), "{}", phone);
        }

        /// Anything else goes to the crate, so `is_valid` agrees everywhere.
        #[test]
        fn prop_is_valid_total(phone in r"\+?[0-9 ()+-]{0,18}") {
            prop_assert_eq!(is_valid(&phone), crate_is_valid(&phone), "{}", phone);
        }
    }
}
