//! A component whose `handle` has another signature than Squall's `handler` world.

wit_bindgen::generate!({ path: "wit", world: "greeter" });

struct Greeter;

impl Guest for Greeter {
    fn handle(name: String) -> String {
        format!("hello, {name}")
    }
}

export!(Greeter);
