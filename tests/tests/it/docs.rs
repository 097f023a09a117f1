//! The README documents every setting and every Redis key the code uses.

use broker_core::config::{defaults_table, ENV_NAMES};
use broker_core::Keys;
use broker_proto::Conversation;

fn readme() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("read README.md")
}

#[test]
fn every_setting_is_in_the_readme_table() {
    let readme = readme();
    for name in ENV_NAMES {
        assert!(
            readme.contains(&format!("| `{name}` |")),
            "README.md does not document {name}"
        );
    }
    assert_eq!(defaults_table().len(), ENV_NAMES.len());
}

#[test]
fn every_key_is_in_the_readme_table() {
    let readme = readme();
    let k = Keys::new("bt", "0");
    let c = Conversation::from_key("<conversation>");
    for key in [
        k.ready(),
        k.processing("<drainer-id>"),
        k.queue(&c),
        k.conversation(&c),
        k.message("<message-id>"),
        k.events("<message-id>"),
        k.dedup(&c, "<client-message-id>"),
        k.drainers(),
        k.dead(),
        k.stats(),
        k.oldest(),
        k.held(),
        k.paused(),
        k.reply_channel("<api-instance>"),
    ] {
        assert!(
            readme.contains(&format!("| `{key}` |")),
            "README.md does not document {key}"
        );
    }
}
