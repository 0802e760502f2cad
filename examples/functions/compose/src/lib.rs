//! `compose`: calls the registered functions `incr` and then `square`: square(incr(x)).

fn handle(input: &[u8]) -> Result<Vec<u8>, String> {
    let incremented = squall_sdk::call("incr", input).map_err(|e| e.to_string())?;
    squall_sdk::call("square", &incremented).map_err(|e| e.to_string())
}

squall_sdk::handler!(handle);
