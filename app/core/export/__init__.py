"""Export a trained adapter: the adapter itself, a merged 16-bit model, or a GGUF file with an
Ollama Modelfile; each with a model card (README.md) saying what it is and how it was checked.

Here: the target folder's rules and the three formats. merged.py merges (tensor by tensor with
merge.py where the files allow) and checks the result; gguf.py writes GGUF and gguf_check.py reads
it back; modelfile.py writes Ollama's Modelfile; card.py the model card.

Every export is atomic: it is written into a staging sibling of `--out` and swapped into place
only when complete, so a failure or a full disk never leaves half a model behind (target.py: the
marker that lists what an export wrote, the swap, the repair of one a killed process left half
done, one export at a time per folder). An existing folder is replaced only with `force` and only
when it is empty or holds nothing but an earlier export's listed files, and never when it is (or
holds) the home folder, the current folder, Tunesmith's own folders, a run, the adapter or the base
model being exported, or lies inside a run. Free disk space and RAM are checked before anything is
written; a disk that fills up anyway, or any other failure to write, is one line, and nothing stays.
"""
