//! placeholder until the real module lands
#[derive(Debug, Clone)]
pub struct Challenge;
pub fn choose<'a>(_v: impl IntoIterator<Item = &'a str>) -> Option<Challenge> {
    None
}
#[allow(clippy::too_many_arguments)]
pub fn authorization(
    _c: &Challenge,
    _u: &str,
    _p: &str,
    _m: &str,
    _uri: &str,
    _cn: &str,
    _nc: u32,
) -> String {
    String::new()
}
