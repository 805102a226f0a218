//! A synthetic CRM data set, generated deterministically from a seed, for
//! the demo, tests and benchmarks. Every person in it is invented: names come
//! from short lists, phone numbers from valid mainland mobile ranges, and
//! national ids have a valid GB 11643 check digit but random digits.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sovra_proto::vault::v1 as pb;

const SURNAMES: &[&str] = &[
    "Wang", "Li", "Zhang", "Liu", "Chen", "Yang", "Zhao", "Huang", "Zhou", "Wu", "Xu", "Sun", "Hu",
    "Zhu", "Gao", "Lin",
];
const GIVEN: &[&str] = &[
    "Wei", "Fang", "Na", "Min", "Jing", "Lei", "Qiang", "Yan", "Jun", "Hui", "Xin", "Tao", "Ming",
    "Chao", "Ling", "Hao",
];
const COMPANIES: &[(&str, &str)] = &[
    ("Hengtai Logistics", "G54"),
    ("Jinhua Insurance", "J68"),
    ("Longmen Software", "I65"),
    ("Baiyun Foods", "C14"),
    ("Qinghe Textiles", "C17"),
    ("Dongfang Energy Services", "D44"),
    ("Huaxia Retail", "F52"),
    ("Xinghai Construction", "E47"),
    ("Tianyuan Healthcare", "Q84"),
    ("Ruifeng Consulting", "L72"),
];
const REGIONS: &[&str] = &[
    "Beijing",
    "Shanghai",
    "Guangdong",
    "Zhejiang",
    "Jiangsu",
    "Sichuan",
    "Hubei",
    "Shandong",
    "Fujian",
    "Hunan",
];
const MOBILE_PREFIXES: &[&str] = &[
    "130", "131", "135", "136", "137", "138", "139", "150", "151", "152", "157", "158", "159",
    "186", "187", "188",
];
const AREA_CODES: &[&str] = &[
    "110101", "310104", "440106", "330106", "320102", "510104", "420102", "370102",
];

/// One synthetic customer.
#[derive(Debug, Clone)]
pub struct Customer {
    /// Customer id, `cust-000000`.
    pub id: String,
    /// Full name.
    pub name: String,
    /// Phone, as a person would type it (not normalised).
    pub phone: String,
    /// Phone in E.164.
    pub phone_e164: String,
    /// Email (mixed case, as typed).
    pub email: String,
    /// 18-character PRC resident id.
    pub national_id: String,
    /// Company.
    pub company: String,
    /// GB/T 4754 code of the company.
    pub industry_code: String,
    /// Region.
    pub region: String,
    /// Budget in CNY.
    pub budget: i64,
    /// Purchases so far.
    pub purchase_count: i64,
    /// Last contact (ms).
    pub last_contact_ms: i64,
    /// White-paper reading time (s).
    pub whitepaper_dwell_s: i64,
    /// Whether the customer bought after the campaign: the label the lead
    /// scoring model is fitted on (see [`converted`]). Never written to the
    /// vault.
    pub converted: bool,
}

/// The synthetic ground truth of conversion: a customer converts with
/// probability sigmoid(−4 + 0.008·budget/10,000 + 0.06·purchases +
/// 0.04·minutes reading white papers + ε), ε uniform in ±1.5, drawn from its
/// own generator so that adding the label left the other fields unchanged.
pub fn converted(rng: &mut ChaCha8Rng, budget: i64, purchases: i64, dwell_s: i64) -> bool {
    let eps: f64 = rng.gen_range(-1.5..1.5);
    let logit = -4.0
        + 0.008 * (budget / 10_000) as f64
        + 0.06 * purchases as f64
        + 0.04 * (dwell_s / 60) as f64
        + eps;
    rng.gen_bool(1.0 / (1.0 + (-logit).exp()))
}

fn id_check_digit(first17: &str) -> char {
    const W: [u32; 17] = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2];
    const C: [char; 11] = ['1', '0', 'X', '9', '8', '7', '6', '5', '4', '3', '2'];
    let sum: u32 = first17
        .chars()
        .zip(W)
        .map(|(c, w)| c.to_digit(10).unwrap_or(0) * w)
        .sum();
    C[(sum % 11) as usize]
}

/// Generates `n` customers from `seed`; the same seed gives the same data.
pub fn generate(seed: u64, n: usize) -> Vec<Customer> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut label_rng = ChaCha8Rng::seed_from_u64(seed ^ 0x6c61_6265_6c73);
    (0..n)
        .map(|i| {
            let pick = |rng: &mut ChaCha8Rng, xs: &[&'static str]| xs[rng.gen_range(0..xs.len())];
            let surname = pick(&mut rng, SURNAMES);
            let given = pick(&mut rng, GIVEN);
            let prefix = pick(&mut rng, MOBILE_PREFIXES);
            // The index keeps numbers unique; the random part makes them look real.
            let subscriber = (i as u64 * 7919 + rng.gen_range(0..7919)) % 100_000_000;
            let digits = format!("{prefix}{subscriber:08}");
            let phone = format!("{} {} {}", &digits[..3], &digits[3..7], &digits[7..]);
            let (company, industry) = COMPANIES[rng.gen_range(0..COMPANIES.len())];
            let year = rng.gen_range(1960..2004);
            let month = rng.gen_range(1..=12);
            let day = rng.gen_range(1..=28);
            let first17 = format!(
                "{}{year}{month:02}{day:02}{:03}",
                pick(&mut rng, AREA_CODES),
                rng.gen_range(0..1000)
            );
            let national_id = format!("{first17}{}", id_check_digit(&first17));
            let domain =
                ["Example.com", "mail.example.cn", "corp.example.net"][rng.gen_range(0..3)];
            Customer {
                id: format!("cust-{i:06}"),
                name: format!("{surname} {given}"),
                phone_e164: format!("+86{digits}"),
                phone,
                email: format!("{}.{}{}@{domain}", given, surname, i),
                national_id,
                company: company.into(),
                industry_code: industry.into(),
                region: pick(&mut rng, REGIONS).into(),
                budget: rng.gen_range(1..500) * 10_000,
                purchase_count: rng.gen_range(0..40),
                last_contact_ms: 1_700_000_000_000 + rng.gen_range(0..40_000_000_000i64),
                whitepaper_dwell_s: rng.gen_range(0..3600),
                converted: false,
            }
        })
        .map(|mut c: Customer| {
            c.converted = converted(
                &mut label_rng,
                c.budget,
                c.purchase_count,
                c.whitepaper_dwell_s,
            );
            c
        })
        .collect()
}

fn text(s: &str) -> pb::Value {
    pb::Value {
        kind: Some(pb::value::Kind::Text(s.into())),
    }
}
fn int(i: i64) -> pb::Value {
    pb::Value {
        kind: Some(pb::value::Kind::Integer(i)),
    }
}

impl Customer {
    /// The customer as a write request.
    pub fn to_request(&self, channel: &str) -> pb::PutRecordRequest {
        let fields = [
            ("name", text(&self.name)),
            ("phone", text(&self.phone)),
            ("email", text(&self.email)),
            ("national_id", text(&self.national_id)),
            ("company", text(&self.company)),
            ("industry_code", text(&self.industry_code)),
            ("region", text(&self.region)),
            ("budget", int(self.budget)),
            ("purchase_count", int(self.purchase_count)),
            (
                "last_contact_ms",
                pb::Value {
                    kind: Some(pb::value::Kind::TimestampMs(self.last_contact_ms)),
                },
            ),
            ("whitepaper_dwell_s", int(self.whitepaper_dwell_s)),
        ];
        pb::PutRecordRequest {
            idempotency_key: String::new(),
            customer_id: self.id.clone(),
            fields: fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
            source: Some(pb::CollectionSource {
                channel: channel.into(),
                collector: "synthetic-crm".into(),
                consent_ref: String::new(),
            }),
        }
    }

    /// The plaintext strings of this customer that must never be found on
    /// disk in the clear.
    pub fn secrets(&self) -> Vec<String> {
        vec![
            self.name.clone(),
            self.phone_e164.clone(),
            self.email.to_lowercase(),
            self.national_id.clone(),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::{RawValue, Schema};

    #[test]
    fn deterministic_and_valid_against_the_schema() {
        let a = generate(7, 300);
        let b = generate(7, 300);
        assert_eq!(
            a.iter().map(|c| &c.phone).collect::<Vec<_>>(),
            b.iter().map(|c| &c.phone).collect::<Vec<_>>()
        );
        let s = Schema::default_crm();
        for c in &a {
            let phone = s
                .normalise(s.field("phone").unwrap(), RawValue::Text(c.phone.clone()))
                .unwrap();
            assert_eq!(
                phone,
                crate::schema::FieldValue::Text(c.phone_e164.clone()),
                "{}",
                c.phone
            );
            s.normalise(s.field("email").unwrap(), RawValue::Text(c.email.clone()))
                .unwrap();
            s.normalise(
                s.field("industry_code").unwrap(),
                RawValue::Text(c.industry_code.clone()),
            )
            .unwrap();
            assert_eq!(c.national_id.len(), 18);
        }
        let phones: std::collections::HashSet<_> = a.iter().map(|c| &c.phone_e164).collect();
        assert_eq!(phones.len(), a.len(), "phones are unique");
    }
}
