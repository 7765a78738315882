# Usage: zsh -f zsh_complete.zsh FPATH_DIR 'command line'
# Prints the matches zsh's completion system offers for the line, one a line. A pseudo-terminal
# (zpty) runs an interactive zsh with compinit; compadd is wrapped to print what it adds.
zmodload zsh/zpty || exit 3
zpty z zsh -f -i
zpty -w z "PROMPT= ; fpath=(${(q)1} \$fpath); autoload -Uz compinit; compinit -u -D"
zpty -w z "zstyle ':completion:*' list-grouped false; zstyle ':completion:*' insert-tab false"
zpty -w z 'compadd() { if [[ ${@[1,(i)(-|--)]} == *-(O|A|D)\ * ]]; then builtin compadd "$@"; return; fi; typeset -a __hits; builtin compadd -A __hits "$@"; (( $#__hits )) && print -r -- "<<${(j:>> <<:)__hits}>>"; }'
zpty -w z '__zc_done() { print -r -- "<<DONE"">>" }; compprefuncs=(); comppostfuncs=(__zc_done)'
zpty -w z "bindkey '^I' complete-word; print -r -- READY"
local line out=""
while zpty -r z line; do [[ $line == READY* ]] && break; done
zpty -w z "$2"$'\t'
while zpty -r z line; do
    out+=$line
    [[ $line == *'<<DONE>>'* ]] && break
done
print -r -- "$out" | grep -o '<<[^>]*>>' | sed 's/^<<//; s/>>$//' | grep -vx DONE
zpty -d z
