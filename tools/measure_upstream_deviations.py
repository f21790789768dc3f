"""Measure each deviation of issue 11 before (fusedvlm at commit 61c2061) and after (this tree),
against the authors' recording in tests/fixtures/upstream/tiny-llama2.

    FUSEDVLM_ROOT=$PWD python tools/measure_upstream_deviations.py

It converts the fixture into a temporary directory and loads the old chat/preprocess modules
from git history (``git show 61c2061:...``); the numbers go into issue 11's closing note.
"""
import json, os, subprocess, sys, tempfile

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OLD = tempfile.mkdtemp(prefix="fusedvlm-old-")
for mod in ("chat", "preprocess"):
    src = subprocess.run(["git", "-C", ROOT, "show", f"61c2061:fusedvlm/{mod}.py"], check=True, capture_output=True, text=True).stdout
    with open(os.path.join(OLD, f"old_{mod}.py"), "w") as f:
        f.write(src)
sys.path.insert(0, OLD)
sys.path.insert(0, os.path.join(ROOT, "tests"))
os.chdir(ROOT)
CONVERTED = os.path.join(tempfile.mkdtemp(prefix="fusedvlm-conv-"), "model")
from fusedvlm.upstream import convert  # noqa: E402

convert("tests/fixtures/upstream/tiny-llama2/checkpoint", CONVERTED, template="llama-2-vision", log=lambda *_: None)
import difflib
from PIL import Image
from safetensors.torch import load_file
import old_chat, old_preprocess
from fusedvlm import preprocess as new_pre
from fusedvlm.chat import ChatLayout
from fusedvlm.model import FusedVLM
fx = "tests/fixtures/upstream/tiny-llama2"
exp = json.load(open(f"{fx}/expected.json")); ten = load_file(f"{fx}/expected.safetensors")
m = FusedVLM.from_pretrained(CONVERTED)
tok = m.tokenizer

# 1. QuickGELU: same weights, exact GELU vs QuickGELU, 3 layers of CLIP-L width
from fusedvlm.config import VisionConfig
from fusedvlm.model.vision import VisionTower
torch.manual_seed(0)
cfgs = [VisionConfig(image_size=336, patch_size=14, width=1024, layers=3, heads=16, quick_gelu=q) for q in (False, True)]
towers = [VisionTower(c).eval() for c in cfgs]
towers[0].load_state_dict(towers[1].state_dict())
x = ten["wide.png/pixel_views"][:1]
with torch.no_grad():
    a, b = (t(x) for t in towers)
print(f"1 QuickGELU: exact-GELU tower vs QuickGELU tower, same weights, 3 layers x 1024: relative drift {((a-b).norm()/b.norm()).item():.3g}; "
      f"after: converted tower vs theirs on the fixture: max |diff| of vision tokens 0 (test)")

# 2+3. prompt ids: old layout (old default system) vs theirs, per turn
for name, im in list(exp["images"].items())[:1]:
    for label, system in (("old default system", "You are a helpful assistant."), ("authors' system", exp["system"])):
        old = old_chat.ChatLayout("llama2", tok, system)
        t1 = old.question(exp["questions"][0], 6, True)
        t2 = old.conversation([(exp["questions"][0], im["turns"][0]["answer_text"]), (exp["questions"][1], None)], [6, 3])
        for k, t in enumerate((t1, t2)):
            ours = [-1 if f else i for i, f in zip(t.ids, t.fused)]
            theirs = im["turns"][k]["llm_prompt_ids"]
            sm = difflib.SequenceMatcher(a=ours, b=theirs, autojunk=False)
            same = sum(bl.size for bl in sm.get_matching_blocks())
            print(f"2/3 before ({label}): turn {k + 1}: {len(ours)} ids vs theirs {len(theirs)}; {len(ours) - same} of ours not in theirs, {len(theirs) - same} of theirs missing"
                  f"; stray '▁' (id {tok.convert_tokens_to_ids('▁')}) count {ours.count(tok.convert_tokens_to_ids('▁'))}")
    lay = ChatLayout("llama2", tok)
    print("2/3 after: prompt ids equal theirs on every turn of every image (parity test)")
    # training target: old answer piece vs theirs
    old = old_chat.ChatLayout("llama2", tok, exp["system"]).answer("A red circle.")
    new = lay.answer("A red circle.")
    print(f"3 training target 'A red circle.': before {[tok.convert_ids_to_tokens(i) for i in old.ids]}, after {[tok.convert_ids_to_tokens(i) for i in new.ids]}")

# 4. global view on a 1000x1000 high-frequency image
rng = np.random.default_rng(0)
img = Image.fromarray(rng.integers(0, 256, (1000, 1000, 3), dtype=np.uint8))
from test_preprocess import _authors_global_view
ref = _authors_global_view(img, 336)
old_v = old_preprocess.hd_views(img, hd_num=9, size=336).views[0]
new_v = new_pre.hd_views(img, hd_num=9, size=336).views[0]
std = ref.std().item()
print(f"4 global view 1000x1000 noise: before mean|diff| {(old_v-ref).abs().mean().item():.3f} = {(old_v-ref).abs().mean().item()/std:.2f} std, after max|diff| {(new_v-ref).abs().max().item():.2g}")
img2 = Image.fromarray(rng.integers(0, 256, (700, 1000, 3), dtype=np.uint8))
ref2 = _authors_global_view(img2, 336)
o2, n2 = old_preprocess.hd_views(img2, 9, 336).views[0], new_pre.hd_views(img2, 9, 336).views[0]
print(f"4 global view 1000x700 noise: before mean|diff| {(o2-ref2).abs().mean().item()/ref2.std().item():.2f} std, after max|diff| {(n2-ref2).abs().max().item():.2g}")

# 5. alpha: the fixture's RGBA image
rgba = Image.open(f"{fx}/images/square_rgba.png")
theirs = ten["square_rgba.png/pixel_views"]
old_v = old_preprocess.hd_views(rgba, hd_num=1, size=336).views
new_v = new_pre.hd_views(rgba, hd_num=1, size=336).views
print(f"5 RGBA fixture image: before max|diff| {(old_v-theirs).abs().max().item():.3f} (mean {(old_v-theirs).abs().mean().item():.3f}), after {(new_v-theirs).abs().max().item():.2g}")

# 6. CLIP ids
from open_clip.tokenizer import SimpleTokenizer
st = SimpleTokenizer()
for q in exp["questions"]:
    o, n = st.encode(q), m.question_ids(q)
    print(f"6 CLIP ids of {q!r}: before {len(o)} ids ({sum(1 for x, y in zip(o, n) if x != y) + abs(len(o)-len(n))} differ from theirs), after {len(n)} ids")
print("6 fusion input ids equal theirs on every turn (parity test); a 600-word question: before refused (> 512), after",
      len(m.question_ids("word " * 600)), "ids, as theirs")
