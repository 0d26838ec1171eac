"""The comparison page `prlhf serve --db` serves at /ui?token=TOKEN: plain HTML and a little JavaScript, no build
step. It asks the server for two responses to the user's prompt ("compare": true), shows them side by side in
the order the server drew, and posts the choice (buttons, or the keys 1 / 2 / 3 / 4) to /v1/feedback. A server
started with --onboard-pairs first shows the user its onboarding pairs, one after another (/v1/onboarding/next),
then their own prompts. The token from the personal link goes in every request's Authorization header."""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>prlhf: which answer is better?</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body { font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
 textarea { width: 100%; height: 4rem; font: inherit; }
 .pair { display: flex; gap: 1rem; margin: 1rem 0; }
 .pair div { flex: 1; border: 1px solid #bbb; border-radius: 6px; padding: .75rem; white-space: pre-wrap;
             min-height: 4rem; }
 button { font: inherit; padding: .4rem .9rem; margin-right: .4rem; }
 #status { color: #555; margin-top: 1rem; }
 .error { color: #b00; }
</style></head>
<body>
<h1>Which answer is better?</h1>
<p id="who">Loading...</p>
<textarea id="prompt" placeholder="Ask something">Write a short note to the team about Friday.</textarea>
<p><button id="ask">Get two answers</button></p>
<div class="pair"><div id="left"></div><div id="right"></div></div>
<p id="choices" hidden>
 <button id="choose-left">Left is better (1)</button><button id="choose-right">Right is better (2)</button>
 <button id="choose-tie">Tie (3)</button><button id="choose-both_bad">Both bad (4)</button>
</p>
<p id="status"></p>
<script>
const token = new URLSearchParams(location.search).get("token") || "";
const headers = {"Content-Type": "application/json", "Authorization": "Bearer " + token};
let model = null, pair = null, maxTokens = 64, fetching = false;
const $ = (id) => document.getElementById(id);

function show(state) {
  $("who").textContent = "You are " + state.user + ": " + state.comparisons + " comparison(s) so far. " +
    (state.user_model === "active" ? "Your own model is active." :
     state.user_model === "fitting" ? "Your own model is being fitted..." :
     "You get the generic model until your own is fitted.");
  $("who").dataset.model = state.user_model;
  $("who").dataset.comparisons = state.comparisons;
}
async function call(path, body) {
  const response = await fetch(path, body === undefined ? {headers} : {method: "POST", headers,
                                                                     body: JSON.stringify(body)});
  const data = await response.json();
  if (!response.ok) { throw new Error(data.error ? data.error.message : response.statusText); }
  return data;
}
function fail(err) { $("status").textContent = err.message; $("status").className = "error"; }
async function refresh() {
  const state = await call("/v1/me");
  maxTokens = Math.min(64, state.max_tokens);
  show(state);
  const onboarding = state.onboard_pairs_left > 0;
  $("ask").hidden = onboarding; $("prompt").readOnly = onboarding;  // the user's own prompts come after
  if (onboarding && !pair && !fetching) { await onboardingPair(); }
  if (state.user_model === "fitting") { setTimeout(() => refresh().catch(fail), 500); }  // until it is served
}
function display(id, texts, shownLeft) {
  const leftIsA = shownLeft === "a";
  pair = {id, left: leftIsA ? "a" : "b", right: leftIsA ? "b" : "a"};
  $("left").textContent = leftIsA ? texts[0] : texts[1];
  $("right").textContent = leftIsA ? texts[1] : texts[0];
  $("choices").hidden = false;
}
async function onboardingPair() {  // the server's own pairs first: they tell it most about a newcomer
  fetching = true;
  try {
    const data = await call("/v1/onboarding/next", {});
    if (data.done) { $("ask").hidden = false; $("prompt").readOnly = false; return; }
    const prompt = typeof data.prompt === "string" ? data.prompt : data.prompt[data.prompt.length - 1].content;
    $("prompt").value = prompt;
    display(data.comparison_id, data.choices.map((c) => c.text), data.shown_left);
    $("status").className = "";
    $("status").textContent = "Question " + data.number + " of " + data.total + ": which answer do you prefer?";
    $("status").dataset.onboarding = data.number;
  } finally { fetching = false; }
}
async function ask() {
  $("status").textContent = "Generating..."; $("status").className = ""; $("choices").hidden = true;
  const data = await call("/v1/completions", {model, prompt: $("prompt").value, max_tokens: maxTokens,
                                                   compare: true});
  display(data.prlhf.comparison_id, data.choices.map((c) => c.text), data.prlhf.shown_left);
  $("status").textContent = "Pick one.";
}
async function choose(which) {
  if (!pair) { return; }
  const choice = which === "left" ? pair.left : which === "right" ? pair.right : which;
  const id = pair.id; pair = null; $("choices").hidden = true;
  await call("/v1/feedback", {comparison_id: id, choice});
  $("status").textContent = "Saved."; await refresh();
}
$("ask").onclick = () => ask().catch(fail);
for (const which of ["left", "right", "tie", "both_bad"]) {
  $("choose-" + which).onclick = () => choose(which).catch(fail);
}
document.addEventListener("keydown", (e) => {
  if (e.target === $("prompt")) { return; }
  const which = {"1": "left", "2": "right", "3": "tie", "4": "both_bad"}[e.key];
  if (which) { choose(which).catch(fail); }
});
call("/v1/models").then((d) => { model = d.data[0].id; return refresh(); }).catch(fail);
</script>
</body></html>
"""
